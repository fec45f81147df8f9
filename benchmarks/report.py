"""CSV in and out, the markdown table (with ratios to eager and compile) and the PNG plots.

Ratios are provider / baseline for both time and memory, so below 1 is better. The compile
baseline is ``compile`` (static shapes), or ``compile-dynamic`` where only that one ran.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict

from .providers import ALL

MODES = ("fwd", "bwd", "fwd_bwd")
FIELDS = ["date", "machine", "device", "torch", "triton", "liger", "commit", "preset",
          "provider", "mode", "batch", "seq", "tokens", "vocab", "hidden", "views", "dtype",
          "metric", "value", "unit", "status", "note"]


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _case_key(r):
    return (r["preset"], int(r["batch"]), int(r["seq"]), int(r["vocab"]), r["dtype"])


def collect(rows: list[dict]):
    """({(case, mode, provider): {metric: value, "status", "note"}}, cases in first-seen
    order, providers in canonical order)."""
    table = defaultdict(dict)
    cases, providers = [], set()
    for r in rows:
        key = _case_key(r)
        if key not in cases:
            cases.append(key)
        providers.add(r["provider"])
        cell = table[(key, r["mode"], r["provider"])]
        cell.setdefault("status", r["status"])
        cell.setdefault("note", r["note"])
        if r["metric"] != "status" and r["value"] not in ("", None):
            cell[r["metric"]] = float(r["value"])
    order = [p for p in ALL if p in providers] + sorted(providers - set(ALL))
    return table, cases, order


def _fmt(x, kind: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if kind == "ratio":
        return f"{x:.2f}"
    if kind == "err":
        return f"{x:.1e}"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


def _ratio(cell, base, metric):
    if not base or metric not in cell or metric not in base or base[metric] <= 0:
        return None
    return cell[metric] / base[metric]


def markdown_table(rows: list[dict], modes=MODES) -> str:
    table, cases, providers = collect(rows)
    head = ("| preset | B x T | V | dtype | mode | provider | time ms | / eager | / compile "
            "| peak MiB | / eager | / compile | GB/s | loss rel err | grad rel err | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    not_run: dict = {}
    for case in cases:
        preset, b, t, v, dtype = case
        for mode in modes:
            eager = table.get((case, mode, "eager"))
            comp = (table.get((case, mode, "compile"))
                    or table.get((case, mode, "compile-dynamic")))
            for p in providers:
                cell = table.get((case, mode, p))
                if cell is None:
                    continue
                if cell["status"] != "ok":
                    not_run.setdefault((p, cell["status"], cell["note"]), set()).add(
                        f"{preset} {b}x{t} V{v} {dtype}")
                    continue
                lines.append(
                    f"| {preset} | {b} x {t} | {v} | {dtype} | {mode} | {p} | "
                    f"{_fmt(cell.get('time_ms'), 'num')} | "
                    f"{_fmt(_ratio(cell, eager, 'time_ms'), 'ratio')} | "
                    f"{_fmt(_ratio(cell, comp, 'time_ms'), 'ratio')} | "
                    f"{_fmt(cell.get('mem_mb'), 'num')} | "
                    f"{_fmt(_ratio(cell, eager, 'mem_mb'), 'ratio')} | "
                    f"{_fmt(_ratio(cell, comp, 'mem_mb'), 'ratio')} | "
                    f"{_fmt(cell.get('gbps'), 'num')} | "
                    f"{_fmt(cell.get('loss_rel_err'), 'err')} | "
                    f"{_fmt(cell.get('grad_rel_err'), 'err')} | {cell['note']} |")
    if not_run:
        lines += ["", "Not run:", ""]
        for (p, status, note), where in not_run.items():
            lines.append(f"- {p}, {len(where)} case(s): {status}: {note}")
    return "\n".join(lines) + "\n"


def first_call_table(rows: list[dict], modes=MODES) -> str:
    """First call against steady state, per case, mode and provider (``--first-call``)."""
    table, cases, providers = collect(rows)
    head = ("| preset | B x T | V | dtype | mode | provider | first ms | steady ms | first / "
            "steady time | first peak MiB | steady peak MiB | first / steady peak |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for case in cases:
        preset, b, t, v, dtype = case
        for mode in modes:
            for p in providers:
                cell = table.get((case, mode, p))
                if not cell or "first_mem_mb" not in cell:
                    continue
                first = {"time_ms": cell["first_time_ms"], "mem_mb": cell["first_mem_mb"]}
                lines.append(
                    f"| {preset} | {b} x {t} | {v} | {dtype} | {mode} | {p} | "
                    f"{_fmt(first['time_ms'], 'num')} | {_fmt(cell['time_ms'], 'num')} | "
                    f"{_fmt(_ratio(first, cell, 'time_ms'), 'ratio')} | "
                    f"{_fmt(first['mem_mb'], 'num')} | {_fmt(cell['mem_mb'], 'num')} | "
                    f"{_fmt(_ratio(first, cell, 'mem_mb'), 'ratio')} |")
    return "\n".join(lines) + "\n"


def _anchor(cases, axis: int):
    """The value of the other axis with the most distinct values along ``axis``."""
    counts = defaultdict(set)
    for _preset, b, t, v, _dtype in cases:
        tok = b * t
        if axis == 0:  # sweep tokens at fixed vocab
            counts[v].add(tok)
        else:
            counts[tok].add(v)
    return max(counts, key=lambda k: (len(counts[k]), k)) if counts else None


def plots(rows: list[dict], out_dir: str, modes=MODES) -> list[str]:
    """time and peak memory vs vocab (at the anchor token count) and vs tokens (at the anchor
    vocab), one line per provider; one PNG per preset and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, cases, providers = collect(rows)
    paths = []
    for preset in dict.fromkeys(c[0] for c in cases):
        pc = [c for c in cases if c[0] == preset]
        fixed_vocab, fixed_tokens = _anchor(pc, 0), _anchor(pc, 1)
        for dtype in dict.fromkeys(c[4] for c in pc):
            for mode in modes:
                fig, axes = plt.subplots(2, 2, figsize=(11, 8))
                drawn = False
                panels = (("vocab", lambda c, ft=fixed_tokens: c[1] * c[2] == ft),
                          ("tokens", lambda c, fv=fixed_vocab: c[3] == fv))
                metrics = (("time_ms", "median time (ms)", "time"),
                           ("mem_mb", "peak memory above inputs (MiB)", "memory"))
                for col, (metric, label, short) in enumerate(metrics):
                    for row, (xname, keep) in enumerate(panels):
                        ax = axes[row][col]
                        for p in providers:
                            pts = []
                            for c in pc:
                                cell = table.get((c, mode, p))
                                if c[4] != dtype or not keep(c) or not cell:
                                    continue
                                if metric in cell:
                                    x = c[3] if xname == "vocab" else c[1] * c[2]
                                    pts.append((x, cell[metric]))
                            if pts:
                                pts.sort()
                                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                                        label=p)
                                drawn = True
                        fixed = (f"tokens = {fixed_tokens}" if xname == "vocab"
                                 else f"V = {fixed_vocab}")
                        ax.set(xlabel=xname, ylabel=label, title=f"{short} vs {xname} ({fixed})")
                        ax.set_xscale("log")
                        ax.set_yscale("log")
                        ax.grid(True, which="both", alpha=0.3)
                        if ax.lines:
                            ax.legend(fontsize=8)
                if drawn:
                    fig.suptitle(f"UniSD loss, preset {preset}, {dtype}, {mode}")
                    fig.tight_layout()
                    path = os.path.join(out_dir, f"plot_{preset}_{dtype}_{mode}.png")
                    fig.savefig(path, dpi=90)
                    paths.append(path)
                plt.close(fig)
    return paths
