"""Ablations of the facts task: each mechanism of UniSD* on its own against plain SD, on the
clean task and where the teacher is unreliable (docs/ablations.md).

``python -m experiments.ablation`` (from the repository root) pre-trains one base model
(cached), then trains every (variant, mode, method, seed) from it, one thread per run,
``--workers`` runs at a time. Each run's record (accuracy on all facts, on the facts whose
teacher context is right and on those whose context is wrong, how often the student repeats
the teacher's mistake, retention KL and perplexity) is appended to ``records.csv`` as it
finishes; an interrupted ablation resumes from it. At the end: ``table.md`` (mean and
standard deviation over seeds), ``effects.md`` (each method minus plain SD, paired by seed)
and ``ablation.png``.

A method is a name of ``unisd-train --method`` or ``name/field=value/...`` with TrainConfig
overrides (e.g. ``agreement/agreement_gamma=1``): tune a mechanism here, on every seed.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import statistics
import sys
import time
import typing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from experiments.tasks.unreliable import Unreliability, UnreliableTask, unreliable_task
from unisd_fast.train.config import METHODS, TrainConfig
from unisd_fast.train.tasks import facts

log = logging.getLogger("experiments.ablation")

DEFAULT_METHODS = (
    "sft", "sd", "gkd", "agreement", "clip", "contrastive", "match", "ema", "unisd_star"
)
MODES = {"full": 0, "lora": 16}
FIELDS = (
    "variant", "mode", "method", "seed", "steps", "accuracy", "acc_right", "acc_wrong",
    "copied", "teacher_accuracy", "kl_base", "retention_ppl", "wall_s",
)
COLUMNS = (  # record key, column label, format
    ("accuracy", "acc (all)", "{:.1%}"),
    ("acc_right", "acc, right ctx", "{:.1%}"),
    ("acc_wrong", "acc, wrong ctx", "{:.1%}"),
    ("copied", "copied mistake", "{:.1%}"),
    ("teacher_accuracy", "teacher acc", "{:.1%}"),
    ("kl_base", "KL to base", "{:.3f}"),
    ("retention_ppl", "retention ppl", "{:.2f}"),
)


@dataclass(frozen=True)
class Spec:
    """One training run of the ablation."""

    variant: str
    mode: str
    method: str
    seed: int
    steps: int
    base: str
    work_dir: str
    knobs: Unreliability
    train: tuple[tuple[str, object], ...]

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.variant, self.mode, self.method, str(self.seed)


def parse_method(token: str) -> tuple[str, dict]:
    """``name`` or ``name/field=value/...`` -> (method, TrainConfig overrides)."""
    name, *pairs = token.split("/")
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not one of {METHODS}")
    hints = typing.get_type_hints(TrainConfig)
    overrides = {}
    for pair in pairs:
        field, sep, text = pair.partition("=")
        if not sep or field not in hints:
            raise ValueError(f"method override {pair!r} must be FIELD=VALUE of a TrainConfig field")
        kinds = typing.get_args(hints[field]) or (hints[field],)
        kind = next(k for k in kinds if k is not type(None))
        overrides[field] = kind(text)
    return name, overrides


def train_config(spec: Spec) -> TrainConfig:
    method, overrides = parse_method(spec.method)
    values = dict(spec.train)
    lora_r = MODES[spec.mode]
    if lora_r:
        values.update(lora_r=lora_r, lora_alpha=2.0 * lora_r, lora_dropout=0.0,
                      lr=values.pop("lora_lr"))
    else:
        values.update(lora_r=0)
        values.pop("lora_lr")
    run_dir = Path(spec.work_dir) / spec.variant / spec.mode / spec.method.replace("/", "_")
    return TrainConfig(
        model=spec.base,
        method=method,
        seed=spec.seed,
        max_steps=spec.steps,
        max_new_tokens=facts.CODE_DIGITS + 1,
        eval_every=0,
        eval_at_start=False,
        eval_batch_size=64,
        keep_checkpoints=1,
        progress=False,
        overwrite=True,
        output_dir=str(run_dir / f"seed{spec.seed}"),
        **{**values, **overrides},
    )


def make_task(spec_or_knobs, seed: int) -> UnreliableTask:
    knobs = spec_or_knobs.knobs if isinstance(spec_or_knobs, Spec) else spec_or_knobs
    return unreliable_task(seed, knobs)


@torch.no_grad()
def greedy_completions(model, tokenizer, texts: list[str], chat_template: bool) -> list[str]:
    """Greedy completions of ``texts``, encoded and decoded as the trainer's evaluation does."""
    from unisd_fast.train.prompts import PromptEncoder
    from unisd_fast.train.rollout import generate, generation_config

    encode = PromptEncoder(tokenizer, chat_template)
    eos = [tokenizer.eos_token_id]
    greedy = generation_config(facts.CODE_DIGITS + 1, tokenizer.pad_token_id, eos)
    y, mask = generate(model.eval(), [encode(t) for t in texts], greedy, torch.device("cpu"))
    keep = mask & (y != tokenizer.eos_token_id)
    rows = zip(y, keep, strict=True)
    return [tokenizer.decode(r[m].tolist(), skip_special_tokens=True) for r, m in rows]


def score(task: UnreliableTask, completions: list[str]) -> dict:
    """Accuracy against the truth on all facts, on the facts whose teacher context is right
    and on those where it is wrong, and how often the student repeats the wrong reference."""
    right, wrong, copied = [], [], []
    for ex, text in zip(task.eval, completions, strict=True):
        ok = text.strip() == ex.target
        if ex.prompt in task.wrong_prompts:
            wrong.append(ok)
            copied.append(text.strip() == ex.demonstration)
        else:
            right.append(ok)

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    return {
        "accuracy": mean(right + wrong),
        "acc_right": mean(right),
        "acc_wrong": mean(wrong),
        "copied": mean(copied),
    }


def load_tuned(cfg: TrainConfig):
    from transformers import AutoModelForCausalLM

    from unisd_fast.train.models.tiny import load_tokenizer

    folder = Path(cfg.output_dir) / "final_model"
    if cfg.lora_r:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(cfg.model)
        return PeftModel.from_pretrained(base, folder).merge_and_unload(), load_tokenizer(cfg.model)
    return AutoModelForCausalLM.from_pretrained(folder), load_tokenizer(cfg.model)


def run_spec(spec: Spec) -> dict:
    """Train one spec, then score its final model on the variant's facts."""
    from unisd_fast.train import run

    torch.set_num_threads(1)
    started = time.perf_counter()
    task = make_task(spec, spec.seed)
    cfg = train_config(spec)
    summary = run(cfg, task)
    model, tokenizer = load_tuned(cfg)
    texts = greedy_completions(model, tokenizer, [ex.prompt for ex in task.eval], True)
    record = score(task, texts)
    final = summary["eval"]
    if abs(record["accuracy"] - final["accuracy"]) > 1e-9:
        raise RuntimeError(
            f"{spec.key}: the reloaded model scores {record['accuracy']} where the run's "
            f"evaluation gave {final['accuracy']}"
        )
    return {
        "variant": spec.variant,
        "mode": spec.mode,
        "method": spec.method,
        "seed": spec.seed,
        "steps": summary["step"],
        **record,
        "teacher_accuracy": final.get("teacher_accuracy"),
        "kl_base": final["kl_base"],
        "retention_ppl": final["retention_ppl"],
        "wall_s": time.perf_counter() - started,
    }


def base_record(base: str, variant: str, knobs: Unreliability, seed: int) -> dict:
    """The shared base model before any training: student and teacher accuracy."""
    from transformers import AutoModelForCausalLM

    from unisd_fast.train.models.tiny import load_tokenizer

    task = make_task(knobs, seed)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), load_tokenizer(base)
    student = score(task, greedy_completions(model, tokenizer, [e.prompt for e in task.eval], True))
    contexts = [task.templates.teacher_text(e.prompt, e.demonstration) for e in task.eval]
    teacher = score(task, greedy_completions(model, tokenizer, contexts, True))
    return {
        "variant": variant, "mode": "-", "method": "base", "seed": seed, "steps": 0, **student,
        "teacher_accuracy": teacher["accuracy"], "kl_base": 0.0, "retention_ppl": None,
        "wall_s": 0.0,
    }


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [
            {k: (v if k in ("variant", "mode", "method") else _number(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def _number(text: str):
    return None if text in ("", "None") else float(text)


class RecordWriter:
    """records.csv, one row appended (and flushed) per finished run."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            with path.open("w", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, FIELDS).writeheader()

    def write(self, record: dict) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, FIELDS).writerow({k: record.get(k) for k in FIELDS})


def group(records: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Records by (variant, mode, method): variants and modes in order of appearance, the
    base first, then the methods in the order of DEFAULT_METHODS (overrides after theirs)."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["mode"], r["method"]), []).append(r)
    variants = list(dict.fromkeys(r["variant"] for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records))

    def rank(key):
        variant, mode, method = key
        name = method.split("/")[0]
        order = DEFAULT_METHODS.index(name) if name in DEFAULT_METHODS else len(DEFAULT_METHODS)
        return variants.index(variant), modes.index(mode), order, method

    return {k: groups[k] for k in sorted(groups, key=rank)}


def spread(values: list[float | None]) -> tuple[float, float, int] | None:
    """(mean, sample standard deviation, n) of the values that are set; None when none."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)


def _cell(stats, fmt: str, signed: bool = False) -> str:
    """``mean ± standard deviation`` (the mean with its sign when ``signed``)."""
    if stats is None:
        return "-"
    mean, sd, _ = stats
    mean_fmt = fmt.replace(":.", ":+.") if signed else fmt
    return f"{mean_fmt.format(round(mean, 6) + 0.0)} ± {fmt.format(round(sd, 6) + 0.0)}"


def table(records: list[dict]) -> str:
    """Markdown: one row per (variant, mode, method), mean ± standard deviation over seeds."""
    head = ["variant", "mode", "method", "seeds", *(label for _, label, _ in COLUMNS), "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (variant, mode, method), rows in group(records).items():
        cells = [_cell(spread([r[k] for r in rows]), fmt) for k, _, fmt in COLUMNS]
        wall = spread([r["wall_s"] for r in rows])
        lines.append(
            f"| {variant} | {mode} | {method} | {len(rows)} | " + " | ".join(cells)
            + f" | {'-' if method == 'base' else f'{wall[0]:.0f}'} |"
        )
    return "\n".join(lines)


def effects(records: list[dict], reference: str = "sd") -> str:
    """Markdown: each method minus ``reference`` on the same (variant, mode, seed), mean ±
    standard deviation of the paired differences."""
    keys = ("accuracy", "acc_right", "acc_wrong", "copied", "kl_base")
    by_run = {(r["variant"], r["mode"], r["method"], r["seed"]): r for r in records}
    head = ["variant", "mode", "method", "seeds", *(f"Δ {label}" for k, label, _ in COLUMNS
                                                     if k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (variant, mode, method), rows in group(records).items():
        if method in (reference, "base"):
            continue
        pairs = [(r, by_run.get((variant, mode, reference, r["seed"]))) for r in rows]
        pairs = [(r, s) for r, s in pairs if s is not None]
        if not pairs:
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            if key not in keys:
                continue
            diffs = [
                r[key] - s[key] for r, s in pairs if r[key] is not None and s[key] is not None
            ]
            cells.append(_cell(spread(diffs), fmt, signed=True))
        row = [variant, mode, method, str(len(pairs)), *cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> Path | None:
    """ablation.png: per method, bars (mean, standard deviation over seeds) per variant and
    mode: accuracy, accuracy on the wrong-context facts, copied mistakes, KL to the base."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no ablation.png (pip install matplotlib)")
        return None
    groups = group([r for r in records if r["method"] != "base"])
    methods = list(dict.fromkeys(m for _, _, m in groups))
    series = list(dict.fromkeys((v, mode) for v, mode, _ in groups))
    panels = [
        ("accuracy", "accuracy, all facts"),
        ("acc_wrong", "accuracy on facts with a wrong teacher context"),
        ("copied", "student repeats the wrong reference"),
        ("kl_base", "retention KL(tuned || base)"),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), sharex=True)
    width = 0.8 / len(series)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for j, (variant, mode) in enumerate(series):
            means, sds = [], []
            for m in methods:
                stats = spread([r[key] for r in groups.get((variant, mode, m), [])])
                means.append(stats[0] if stats else float("nan"))
                sds.append(stats[1] if stats else 0.0)
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(methods))]
            ax.bar(xs, means, width, yerr=sds, capsize=2, label=f"{variant}, {mode}",
                   color=f"C{j}")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(series), fontsize=8)
    axes[-1].set_xticks(range(len(methods)), [m.replace("/", "\n") for m in methods], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def seed_table(run_dirs: list[str]) -> str:
    """Markdown: the first and last evaluation of several runs (one per seed) of
    ``unisd-train``, mean ± standard deviation and [min, max] of each metric."""
    import json

    firsts, lasts = [], []
    for folder in run_dirs:
        lines = (Path(folder) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        evals = [r for r in map(json.loads, lines) if r["kind"] == "eval"]
        firsts.append(evals[0])
        lasts.append(evals[-1])
    lines = [f"| metric ({len(run_dirs)} seeds) | before | after | after, [min, max] |",
             "|---|---|---|---|"]
    for key, label, fmt in (
        ("accuracy", "student accuracy, no reference", "{:.1%}"),
        ("teacher_accuracy", "teacher accuracy, with reference", "{:.1%}"),
        ("kl_base", "retention KL(tuned, base)", "{:.3f}"),
        ("retention_ppl", "retention perplexity (base)", "{:.2f}"),
    ):
        after = [r[key] for r in lasts]
        bounds = f"[{fmt.format(min(after))}, {fmt.format(max(after))}]"
        lines.append(f"| {label} | {_cell(spread([r[key] for r in firsts]), fmt)} | "
                     f"{_cell(spread(after), fmt)} | {bounds} |")
    return "\n".join(lines)


def _init_worker() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)


def run_all(specs: list[Spec], workers: int):
    """(spec, record) as each run finishes: ``workers`` spawned processes of one thread each,
    or in this process one after another when ``workers`` is 0."""
    if workers == 0:
        for spec in specs:
            yield spec, run_spec(spec)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                             initializer=_init_worker) as pool:
        futures = {pool.submit(run_spec, s): s for s in specs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.ablation",
        description="Ablate UniSD*'s mechanisms on the facts task, clean and with an "
        "unreliable teacher (docs/ablations.md).",
    )
    p.add_argument("--output", default="results/ablation", help="records.csv, tables, plot")
    p.add_argument("--work-dir", default="runs/ablation", help="base model and run folders")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods, each NAME or NAME/FIELD=VALUE/...")
    p.add_argument("--variants", default="clean,wrong", help="clean and/or wrong")
    p.add_argument("--modes", default="full,lora", help="full and/or lora (rank 16)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per run")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate, full fine-tuning")
    p.add_argument("--lora-lr", type=float, default=1e-2, help="learning rate with LoRA")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per step")
    p.add_argument("--base-seed", type=int, default=42, help="seed of the shared base model")
    p.add_argument("--pretrain-max-steps", type=int, default=facts.PretrainConfig.max_steps,
                   help="cap on the shared base's pre-training (it stops once the base copies "
                   "held-out references)")
    p.add_argument("--wrong-frac", type=float, default=0.25,
                   help="'wrong' variant: fraction of facts whose teacher reads a wrong code")
    p.add_argument("--view-noise", type=float, default=0.25,
                   help="'wrong' variant: views read the fact's own reference, each wrong "
                   "with this probability (negative: the facts task's views)")
    p.add_argument("--distractors", type=int, default=0,
                   help="'wrong' variant: other facts' reference lines in the teacher prompt")
    p.add_argument("--seed-table", nargs="+", metavar="RUN_DIR",
                   help="only print the before/after table over these unisd-train runs")
    p.add_argument("--workers", type=int, default=2,
                   help="runs at a time, one thread each (0: in this process)")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.seed_table:
        print(seed_table(args.seed_table))
        return 0
    started = time.perf_counter()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pretrain = facts.PretrainConfig(seed=args.base_seed, max_steps=args.pretrain_max_steps)
    base = str(facts.pretrained_base(Path(args.work_dir), pretrain))
    wrong = Unreliability(
        wrong_frac=args.wrong_frac,
        view_noise=None if args.view_noise < 0 else args.view_noise,
        distractors=args.distractors,
    )
    variants = {"clean": Unreliability(), "wrong": wrong}
    chosen = {v: variants[v] for v in args.variants.split(",")}
    train = (("lr", args.lr), ("lora_lr", args.lora_lr), ("batch_size", args.batch_size))
    methods = args.methods.split(",")
    for m in methods:
        parse_method(m)
    seeds = [int(s) for s in args.seeds.split(",")]
    writer = RecordWriter(out / "records.csv")
    done = {(r["variant"], r["mode"], r["method"], str(int(r["seed"])))
            for r in read_records(out / "records.csv") if r["steps"] in (0, args.steps)}
    for variant, knobs in chosen.items():
        for seed in seeds:
            if (variant, "-", "base", str(seed)) not in done:
                writer.write(base_record(base, variant, knobs, seed))
    specs = [
        Spec(v, mode, m, s, args.steps, base, args.work_dir, knobs, train)
        for s in seeds
        for v, knobs in chosen.items()
        for mode in args.modes.split(",")
        for m in methods
    ]
    todo = [s for s in specs if s.key not in done]
    log.info("%d runs (%d already recorded), %d at a time", len(specs), len(specs) - len(todo),
             args.workers)
    for i, (spec, record) in enumerate(run_all(todo, args.workers), 1):
        writer.write(record)
        log.info("[%d/%d] %s: acc %.3f, wrong-ctx acc %s, KL %.3f, %.0f s", i, len(todo),
                 "/".join(spec.key), record["accuracy"], record["acc_wrong"], record["kl_base"],
                 record["wall_s"])
    records = read_records(out / "records.csv")
    wall = time.perf_counter() - started
    (out / "table.md").write_text(table(records) + "\n", encoding="utf-8")
    (out / "effects.md").write_text(effects(records) + "\n", encoding="utf-8")
    png = plot(records, out / "ablation.png")
    if not todo:
        print(table(records), file=sys.stderr)
        return 0
    settings = dict(vars(args))
    (out / "run.txt").write_text(
        f"command: python -m experiments.ablation {' '.join(argv or sys.argv[1:])}\n"
        f"settings: {settings}\nbase: {asdict(pretrain)}\n"
        f"wall time of this invocation: {wall:.0f} s ({len(todo)} runs, {args.workers} "
        f"workers, {os.cpu_count()} CPUs)\n",
        encoding="utf-8",
    )
    print(table(records), file=sys.stderr)
    print(f"\nwall time {wall:.0f} s; plot {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
