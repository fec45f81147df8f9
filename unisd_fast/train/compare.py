"""Reports around ``unisd-train``: the before/after table of the default (facts) run and the
``--compare`` runner (several methods from the same base, side by side, with a plot).

Both print to stderr, so that stdout stays the run's JSON summary, and append a
``{"kind": "summary", ...}`` record to each run's metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .config import TrainConfig
from .loop import check_output_dir, run
from .tasks import builtin_name, facts

log = logging.getLogger("unisd_fast.compare")

METRICS = (  # record key, row label, column label, format
    ("accuracy", "student accuracy, no reference", "student acc", "{:.1%}"),
    ("teacher_accuracy", "teacher accuracy, with reference", "teacher acc", "{:.1%}"),
    ("kl_base", "retention KL(tuned || base)", "KL to base", "{:.3f}"),
    ("retention_ppl", "retention perplexity (base)", "retention ppl", "{:.2f}"),
)


def _cell(record: dict | None, key: str, fmt: str) -> str:
    value = None if record is None else record.get(key)
    return "-" if value is None else fmt.format(round(value, 6) + 0.0)  # no "-0.000"


def before_after_table(summary: dict) -> str:
    """The first and last evaluation of a run, one metric per row."""
    lines = [f"{'metric':<34} {'before':>9} {'after':>9}"]
    for key, label, _, fmt in METRICS:
        before = _cell(summary["first_eval"], key, fmt)
        lines.append(f"{label:<34} {before:>9} {_cell(summary['eval'], key, fmt):>9}")
    return "\n".join(lines)


def comparison_table(summaries: dict[str, dict]) -> str:
    """One row per method (after training) below a row for the shared base (before)."""
    head = f"{'method':<12}" + "".join(f" {column:>13}" for _, _, column, _ in METRICS)
    lines = [head + f" {'wall s':>8}"]
    first = next(iter(summaries.values()))["first_eval"]
    rows = [("base", first, None)]
    rows += [(m, s["eval"], s["wall_time_s"]) for m, s in summaries.items()]
    for name, record, wall in rows:
        cells = "".join(f" {_cell(record, key, fmt):>13}" for key, _, _, fmt in METRICS)
        lines.append(f"{name:<12}{cells} {'-' if wall is None else f'{wall:.0f}':>8}")
    return "\n".join(lines)


def append_summary(output_dir, record: dict) -> None:
    with (Path(output_dir) / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "summary", **record}) + "\n")


@contextlib.contextmanager
def _threads(cfg: TrainConfig):
    """One intra-op thread for the facts task unless OMP_NUM_THREADS says otherwise: the tiny
    model's matrices are too small to share, and on a busy 2-core machine a second thread
    only waits on the first (measured 2-10x slower)."""
    before = torch.get_num_threads()
    if builtin_name(cfg.data) == "facts" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prepare(cfg: TrainConfig) -> tuple[TrainConfig, float]:
    """``cfg`` on the pre-trained facts base when it is the default run; the seconds spent."""
    started = time.perf_counter()
    if facts.uses_facts(cfg):
        cfg = facts.prepare(cfg)
    return cfg, time.perf_counter() - started


def run_reported(cfg: TrainConfig) -> dict:
    """``run`` (or ``--compare``) with the facts pre-training first and a printed report."""
    with _threads(cfg):
        return run_compare(cfg) if cfg.compare else _run_one(cfg)


def _run_one(cfg: TrainConfig) -> dict:
    check_output_dir(cfg)
    started = time.perf_counter()
    cfg, pretrain_s = _prepare(cfg)
    summary = run(cfg)
    summary["total_wall_time_s"] = time.perf_counter() - started
    if builtin_name(cfg.data) == "facts":
        append_summary(
            cfg.output_dir,
            {
                "method": cfg.method,
                "before": summary["first_eval"],
                "after": summary["eval"],
                "pretrain_s": pretrain_s,
                "wall_time_s": summary["total_wall_time_s"],
            },
        )
        title = (
            f"facts task, {cfg.method}, {summary['step']} steps: "
            f"{summary['total_wall_time_s']:.0f} s in all ({pretrain_s:.0f} s pre-training)"
        )
        print(f"\n{title}\n{before_after_table(summary)}\n", file=sys.stderr)
    return summary


def run_compare(cfg: TrainConfig) -> dict:
    """Train each method of ``cfg.compare`` from the same base in ``<output_dir>/<method>``."""
    methods = [m.strip() for m in cfg.compare.split(",")]
    root = Path(cfg.output_dir)
    runs = {m: cfg.replace(method=m, compare=None, output_dir=str(root / m)) for m in methods}
    for method_cfg in runs.values():
        check_output_dir(method_cfg)
    started = time.perf_counter()
    cfg, pretrain_s = _prepare(cfg)
    summaries = {}
    for method, method_cfg in runs.items():
        log.info("compare: training %s", method)
        summaries[method] = run(method_cfg.replace(model=cfg.model))
        append_summary(method_cfg.output_dir, {"method": method, **summaries[method]})
    table = comparison_table(summaries)
    plot = plot_comparison(root, methods)
    result = {
        "output_dir": str(root),
        "methods": summaries,
        "pretrain_s": pretrain_s,
        "plot": str(plot) if plot else None,
        "wall_time_s": time.perf_counter() - started,
    }
    (root / "compare.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"\n{cfg.compare} from the same base ({root}):\n{table}\n", file=sys.stderr)
    return result


def eval_curves(output_dir) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "eval"]


def plot_comparison(root: Path, methods: list[str]) -> Path | None:
    """compare.png: accuracy (student solid, teacher dashed) and retention KL over steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no compare.png (pip install matplotlib)")
        return None
    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, method in enumerate(methods):
        curve = eval_curves(root / method)
        steps = [r["step"] for r in curve]
        color = f"C{i}"
        acc_ax.plot(steps, [r.get("accuracy") for r in curve], color=color, label=method)
        if all("teacher_accuracy" in r for r in curve):
            teacher = [r["teacher_accuracy"] for r in curve]
            acc_ax.plot(steps, teacher, color=color, linestyle="--", alpha=0.6)
        kl_ax.plot(steps, [r.get("kl_base") for r in curve], color=color, label=method)
    acc_ax.set(xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    acc_ax.set_title("student, no reference (solid); teacher, with reference (dashed)")
    kl_ax.set(xlabel="step", ylabel="KL(tuned || base)", title="retention: drift from the base")
    for ax in (acc_ax, kl_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = root / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
