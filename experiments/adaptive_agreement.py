"""Adaptive against full agreement on the unreliable-teacher facts task (docs/ablations.md,
"Adaptive agreement").

``python -m experiments.adaptive_agreement`` (from the repository root):

1. trains, through the ablation harness (``experiments.ablation``: shared cached base, the
   ``wrong`` variant, full fine-tuning and LoRA, ``--seeds``), token agreement at
   ``--gamma`` with full agreement and with ``agreement_coverage=--coverage``; records.csv
   and table.md go to ``--output``, adaptive minus full paired by seed to
   adaptive_effects.md;
2. reads each run's training metrics: the share of view-forward tokens the adaptive runs
   ran and the share of the divergence mass their selection covered (``views.md``);
3. on the same batches (one fixed batch of ``--batch-size`` sampled completions per point),
   compares the adaptive step with the full-agreement step at the base model and at each
   mode's trained full-agreement student (seed of ``--compare-seed``) against the base
   teacher: loss and gradient (over every student weight) relative differences, view tokens
   run, mass covered, for each coverage of ``--compare-coverages`` (``same_batches.md``).

Stage 3 alone: ``--compare-only`` (after stage 1, or at the base model only if no run is
there yet).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import torch

from experiments import ablation
from experiments.tasks.unreliable import Unreliability
from unisd_fast.train.tasks import facts

log = logging.getLogger("experiments.adaptive_agreement")


def methods(gamma: float, coverage: float) -> tuple[str, str]:
    full = f"agreement/agreement_gamma={gamma:g}"
    return full, f"{full}/agreement_coverage={coverage:g}"


def view_table(work_dir: Path, modes: list[str], seeds: list[int], method: str) -> str:
    """Per mode, mean and [min, max] over seeds of the per-step view-token share, covered
    mass share and agreement weight of the adaptive runs."""
    lines = ["| mode | seeds | view tokens run | mass covered | mean weight |",
             "|---|---|---|---|---|"]
    for mode in modes:
        per_seed = {"view_token_frac": [], "covered": [], "mean_weight": []}
        for seed in seeds:
            path = (work_dir / "wrong" / mode / method.replace("/", "_") / f"seed{seed}"
                    / "metrics.jsonl")
            if not path.is_file():
                continue
            train = [r for r in map(json.loads, path.read_text().splitlines())
                     if r.get("kind") == "train" and "view_token_frac" in r]
            for key, values in per_seed.items():
                values.append(statistics.fmean(r[key] for r in train))
        if not per_seed["covered"]:
            continue
        cells = [f"{statistics.fmean(v):.1%} [{min(v):.1%}, {max(v):.1%}]"
                 if k != "mean_weight" else f"{statistics.fmean(v):.4f}"
                 for k, v in per_seed.items()]
        lines.append(f"| {mode} | {len(per_seed['covered'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def same_batch_rows(args, base: str, full: str) -> list[dict]:
    """Stage 3 (module docstring)."""
    from transformers import AutoModelForCausalLM

    from unisd_fast.train.data import build_data
    from unisd_fast.train.distributed import Parallel
    from unisd_fast.train.loop import Context
    from unisd_fast.train.models.tiny import load_tokenizer
    from unisd_fast.train.prompts import PromptEncoder
    from unisd_fast.train.rollout import generate, generation_config
    from unisd_fast.train.step import StepSetup, accumulate
    from unisd_fast.train.teachers import Runner, Scorer

    knobs = Unreliability(wrong_frac=args.wrong_frac, view_noise=args.view_noise)
    tokenizer = load_tokenizer(base)
    points = [("base", "-", AutoModelForCausalLM.from_pretrained(base))]
    for mode in args.modes.split(","):
        spec = ablation.Spec("wrong", mode, full, args.compare_seed, args.steps, base,
                             args.work_dir, knobs, ())
        folder = Path(args.work_dir) / "wrong" / mode / full.replace("/", "_") / \
            f"seed{args.compare_seed}" / "final_model"
        if folder.is_dir():
            cfg = ablation.train_config(_with_train(spec, args))
            points.append((f"trained, seed {args.compare_seed}", mode,
                           ablation.load_tuned(cfg)[0]))
    rows = []
    for label, mode, student in points:
        cfg = ablation.train_config(_with_train(ablation.Spec(
            "wrong", "full", full, args.compare_seed, args.steps, base, args.work_dir,
            knobs, ()), args))
        task = ablation.make_task(knobs, args.compare_seed)
        encode = PromptEncoder(tokenizer, cfg.chat_template)
        eos = [tokenizer.eos_token_id]
        data = build_data(cfg, task, encode, eos[0])
        positions = list(range(args.batch_size))
        items = [data.items[data.schedule.index(p)] for p in positions]
        torch.manual_seed(args.compare_seed)
        sampling = generation_config(cfg.max_new_tokens, tokenizer.pad_token_id, eos,
                                     cfg.sample_temperature)
        with torch.no_grad():
            y, mask = generate(student.eval(), [it.student for it in items], sampling,
                               torch.device("cpu"))
        fixed = [r[m].tolist() for r, m in zip(y, mask, strict=True)]
        teacher = Scorer(Runner(AutoModelForCausalLM.from_pretrained(base)))
        runner = Runner(student.train().requires_grad_(True))
        ctx = Context(cfg, runner, tokenizer, encode, torch.device("cpu"),
                      tokenizer.pad_token_id, eos, None, sampling)
        results = {}
        for coverage in (1.0, *args.compare_coverages):
            loss_cfg = cfg.loss_config().replace(agreement_coverage=coverage)
            setup = StepSetup(runner, teacher, loss_cfg, Parallel(), cfg.loss_path,
                              sampler=lambda pos, its, fixed=fixed: [fixed[p] for p in pos],
                              views=data.views)
            runner.zero_grad(set_to_none=True)
            record = accumulate(ctx, setup, [(positions, items)])
            grad = torch.cat([q.grad.reshape(-1).double() for q in runner.parameters()
                              if q.grad is not None])
            results[coverage] = (record, grad)
        (full_rec, full_grad) = results[1.0]
        for coverage in args.compare_coverages:
            rec, grad = results[coverage]
            rows.append({
                "point": label, "mode": mode, "coverage": coverage,
                "loss_full": full_rec["loss"], "loss_adaptive": rec["loss"],
                "loss_rel_diff": abs(rec["loss"] - full_rec["loss"]) / abs(full_rec["loss"]),
                "grad_rel_diff": float((grad - full_grad).norm() / full_grad.norm()),
                "view_token_frac": rec["view_token_frac"], "covered": rec["covered"],
            })
            log.info("same batch: %s", rows[-1])
    return rows


def _with_train(spec: ablation.Spec, args) -> ablation.Spec:
    """The spec with the harness's training settings (ablation.main builds them so)."""
    train = (("lr", args.lr), ("lora_lr", args.lora_lr), ("batch_size", args.batch_size))
    return ablation.Spec(spec.variant, spec.mode, spec.method, spec.seed, spec.steps,
                         spec.base, spec.work_dir, spec.knobs, train)


def same_batch_table(rows: list[dict]) -> str:
    lines = ["| point | mode | coverage | loss full | loss adaptive | loss rel. diff | "
             "grad rel. diff | view tokens run | mass covered |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['point']} | {r['mode']} | {r['coverage']:g} | {r['loss_full']:.5g} | "
            f"{r['loss_adaptive']:.5g} | {r['loss_rel_diff']:.1e} | {r['grad_rel_diff']:.1e} | "
            f"{r['view_token_frac']:.1%} | {r['covered']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m experiments.adaptive_agreement",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="results/adaptive_agreement")
    p.add_argument("--work-dir", default="runs/ablation")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--coverage", type=float, default=0.9)
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-lr", type=float, default=1e-2)
    p.add_argument("--wrong-frac", type=float, default=0.25)
    p.add_argument("--view-noise", type=float, default=0.25)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pretrain-max-steps", type=int, default=None,
                   help="cap on the shared base's pre-training (the harness's default)")
    p.add_argument("--compare-seed", type=int, default=0)
    p.add_argument("--compare-coverages", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.5, 0.7, 0.9, 0.95])
    p.add_argument("--compare-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    full, adaptive = methods(args.gamma, args.coverage)
    common = ["--work-dir", args.work_dir, "--modes", args.modes, "--seeds", args.seeds,
              "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--lora-lr", str(args.lora_lr),
              "--wrong-frac", str(args.wrong_frac), "--view-noise", str(args.view_noise)]
    pretrain = facts.PretrainConfig(seed=42)
    if args.pretrain_max_steps is not None:
        pretrain = facts.PretrainConfig(seed=42, max_steps=args.pretrain_max_steps)
        common += ["--pretrain-max-steps", str(args.pretrain_max_steps)]
    if not args.compare_only:
        ablation.main(["--output", str(out), "--variants", "wrong", "--methods",
                       f"{full},{adaptive}", "--workers", str(args.workers), *common])
        records = ablation.read_records(out / "records.csv")
        paired = ablation.effects(records, reference=full)
        (out / "adaptive_effects.md").write_text(paired + "\n", encoding="utf-8")
        print(paired)
        seeds = [int(s) for s in args.seeds.split(",")]
        views = view_table(Path(args.work_dir), args.modes.split(","), seeds, adaptive)
        (out / "views.md").write_text(views + "\n", encoding="utf-8")
        print(views)
    base = str(facts.pretrained_base(Path(args.work_dir), pretrain))
    rows = same_batch_rows(args, base, full)
    text = same_batch_table(rows)
    (out / "same_batches.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
