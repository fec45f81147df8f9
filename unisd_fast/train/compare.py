"""Reports around ``unisd-train``: the before/after table of a run and the ``--compare``
runner (several methods from the same base, side by side, with a plot).

Both print to stderr, so that stdout stays the run's JSON summary; ``run`` appends the
``{"kind": "summary", ...}`` record to each run's metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from .config import METHOD_DEFAULTED, TrainConfig
from .lock import output_dir_lock
from .loop import cpu_threads, run
from .resume import find_start
from .tasks import prepare_task

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


def print_report(cfg: TrainConfig, summary: dict) -> None:
    """The before/after table of a run that evaluated before and after training (stderr)."""
    if not summary.get("first_eval") or not summary.get("eval"):
        return
    title = (
        f"{cfg.data}, {cfg.method}, {summary['step']} steps: "
        f"{summary['total_wall_time_s']:.0f} s in all ({summary['prepare_s']:.0f} s preparing)"
    )
    print(f"\n{title}\n{before_after_table(summary)}\n", file=sys.stderr)


def run_reported(cfg: TrainConfig) -> dict:
    """``run`` (or ``--compare``) and its printed report."""
    if cfg.compare:
        return run_compare(cfg)
    summary = run(cfg)
    print_report(cfg, summary)
    return summary


def run_compare(cfg: TrainConfig) -> dict:
    """Train each method of ``cfg.compare`` from the same base in ``<output_dir>/<method>``:
    the task's preparation runs once, in ``<output_dir>``. Loss and EMA options apply to the
    distillation methods only."""
    methods = [m.strip() for m in cfg.compare.split(",")]
    root = Path(cfg.output_dir)
    runs = {}
    for m in methods:
        only_distill = dict.fromkeys(METHOD_DEFAULTED) if m == "sft" else {}
        runs[m] = cfg.replace(method=m, compare=None, output_dir=str(root / m), **only_distill)
    for method_cfg in runs.values():  # before the shared preparation, which may take minutes
        find_start(method_cfg)
    started = time.perf_counter()
    with output_dir_lock(root), cpu_threads(cfg):
        cfg = prepare_task(cfg)
    pretrain_s = time.perf_counter() - started
    summaries = {}
    for method, method_cfg in runs.items():
        log.info("compare: training %s", method)
        summaries[method] = run(method_cfg.replace(model=cfg.model))
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
