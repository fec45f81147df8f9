"""The step ledger: where one optimizer step's wall time goes, per method and phase.

``python -m benchmarks.step_ledger --shape qwen0.5b --layers 2`` builds the shape's model
(``benchmarks.train_step``: random weights, nothing downloaded) with the trainer's roles for
each method (frozen teacher, or the EMA teacher of unisd_star; LoRA or full fine-tuning as
the shape says), fixed random prompts and views, and times ``--steps`` optimizer steps of
``unisd_fast.train.step.accumulate`` after one warm-up step, phase by phase
(``unisd_fast.train.phases``; synchronised on CUDA): sampling (the student generates
``tokens`` new tokens), teacher forward, views forward, negative forward, the selection pass
of adaptive agreement, student forward, the loss itself (on the fused-linear path it
computes the head gradients too), student backward, optimizer (clip + AdamW) and EMA (its
update every ``ema_every`` steps, amortised per step). ``METHOD@c`` is METHOD with
``agreement_coverage=c``. Results: a markdown table on stdout and JSON lines with ``--json``.

``--compare`` adds, for each ``METHOD@c``, the loss and gradient difference of the adaptive
step to the full-agreement step on one fixed batch (same completions, same weights) and the
fraction of view-forward tokens it ran.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

PHASES = ("sampling", "teacher", "views", "negative", "selection", "student_forward", "loss",
          "student_backward", "optimizer", "ema")
METHODS = "sft,sd,gkd,agreement,unisd_star,agreement@0.9,unisd_star@0.9"


def method_config(method: str, spec: dict):
    from unisd_fast.train.config import TrainConfig

    name, _, coverage = method.partition("@")
    extra = {"agreement_coverage": float(coverage)} if coverage else {}
    return TrainConfig(method=name, lora_r=spec["lora_r"], lora_dropout=0.0,
                       batch_size=spec["batch"], max_new_tokens=spec["tokens"],
                       sample_temperature=1.0, **extra)


class Bench:
    """A shape's model, prompts and views; ``setup(method)`` builds a method's roles."""

    def __init__(self, args):
        from unisd_fast.train.data import Item
        from unisd_fast.train.models.tiny import build_tokenizer

        from .train_step import SHAPES

        self.args, self.device = args, torch.device(args.device)
        self.spec = dict(SHAPES[args.shape])
        for key in ("batch", "tokens"):
            if getattr(args, key):
                self.spec[key] = getattr(args, key)
        self.tokenizer = build_tokenizer()
        rng = random.Random(0)
        model = self.model()
        vocab = model.config.vocab_size
        self.vocab, self.layers = vocab, model.config.num_hidden_layers

        def ids(n):
            return [rng.randrange(4, vocab) for _ in range(n)]

        p, B = self.spec["prompt"], self.spec["batch"]
        self.items = [Item(i, ids(p), ids(2 * p), ids(2 * p), ids(self.spec["tokens"]))
                      for i in range(B)]
        self.view_rows = [[ids(2 * p) for _ in range(3)] for _ in self.items]
        self.fixed = [ids(self.spec["tokens"]) for _ in self.items]

    def model(self):
        from .train_step import build_model

        dtype = getattr(torch, self.args.dtype)
        return build_model(self.args.shape, self.args.layers, self.tokenizer).to(
            device=self.device, dtype=dtype)

    def setup(self, method: str, fixed: bool):
        from unisd_fast.train.distributed import Parallel
        from unisd_fast.train.loop import Context
        from unisd_fast.train.roles import build_roles
        from unisd_fast.train.rollout import generation_config
        from unisd_fast.train.step import StepSetup

        cfg = method_config(method, self.spec)
        roles = build_roles(cfg, self.model(), Parallel(), self.device)
        tok = self.tokenizer
        sampling = generation_config(self.spec["tokens"], tok.pad_token_id,
                                     [tok.eos_token_id], 1.0)
        ctx = Context(cfg, roles.runner, tok, None, self.device, tok.pad_token_id,
                      [tok.eos_token_id], None, sampling)
        K = cfg.num_views
        setup = StepSetup(
            roles.runner, roles.teacher, cfg.loss_config(), Parallel(), cfg.loss_path,
            sampler=(lambda pos, its: [self.fixed[p] for p in pos]) if fixed else None,
            views=lambda pos: [self.view_rows[b][k] for k in range(K) for b in pos])
        return cfg, roles, ctx, setup

    def batch(self):
        return [(list(range(len(self.items))), self.items)]


def time_method(bench: Bench, method: str) -> dict:
    from unisd_fast.train.distributed import clip_grad_norm
    from unisd_fast.train.phases import PhaseTimer
    from unisd_fast.train.step import accumulate

    cfg, roles, ctx, setup = bench.setup(method, fixed=False)
    params = [q for q in roles.runner.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ema_every = cfg.ema_settings()[1] if roles.ema is not None else 1
    torch.manual_seed(0)
    steps, record = [], {}
    for step in range(bench.args.steps + 1):
        timer = PhaseTimer(bench.device)
        setup.timer = timer
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        record = accumulate(ctx, setup, bench.batch())
        with timer("optimizer"):
            clip_grad_norm(params, 1.0)
            optimizer.step()
        if roles.ema is not None:
            with timer("ema"):
                roles.ema.update(roles.own)
            timer.seconds["ema"] /= ema_every
        if bench.device.type == "cuda":
            torch.cuda.synchronize(bench.device)
        total = time.perf_counter() - t0
        if step:  # the first step warms up
            steps.append({**timer.seconds, "step": total - timer.seconds.get("ema", 0.0)
                          * (ema_every - 1)})
    mean = {k: sum(s.get(k, 0.0) for s in steps) / len(steps) for k in (*PHASES, "step")}
    return {"method": method, "seconds": mean, "view_token_frac": record.get("view_token_frac"),
            "covered": record.get("covered")}


def compare(bench: Bench, method: str) -> dict:
    """Adaptive against full agreement on one fixed batch from the same weights."""
    from unisd_fast.train.step import accumulate

    full_method = method.partition("@")[0]
    out = {}
    for name in (full_method, method):
        torch.manual_seed(0)
        _, roles, ctx, setup = bench.setup(name, fixed=True)
        roles.runner.zero_grad(set_to_none=True)
        record = accumulate(ctx, setup, bench.batch())
        grads = torch.cat([q.grad.reshape(-1).double() for q in roles.runner.parameters()
                           if q.grad is not None])
        out[name] = (record, grads)
    (full, g_full), (adaptive, g_adaptive) = out[full_method], out[method]
    return {"method": method, "loss_full": full["loss"], "loss_adaptive": adaptive["loss"],
            "loss_rel_diff": abs(adaptive["loss"] - full["loss"]) / abs(full["loss"]),
            "grad_rel_diff": float((g_adaptive - g_full).norm() / g_full.norm()),
            "view_token_frac": adaptive["view_token_frac"], "covered": adaptive["covered"]}


def table(bench: Bench, rows: list[dict]) -> str:
    base = next((r["seconds"]["step"] for r in rows if r["method"] == "sd"), None)
    head = ["method", *PHASES, "step s", "/ sd", "view tokens run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["seconds"]
        cells = [r["method"], *(f"{s[p]:.2f}" if s[p] else "-" for p in PHASES),
                 f"{s['step']:.2f}", f"{s['step'] / base:.2f}" if base else "-",
                 "-" if r["view_token_frac"] is None else f"{r['view_token_frac']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .train_step import SHAPES

    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_ledger", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (shape's default)")
    ap.add_argument("--batch", type=int, default=None, help="sequences (shape's default)")
    ap.add_argument("--tokens", type=int, default=None, help="completion tokens")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here (JSON lines)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    bench = Bench(args)
    rows = [time_method(bench, m) for m in args.methods.split(",")]
    spec = bench.spec
    print(f"step ledger, shape {args.shape} ({bench.layers} layers, vocab {bench.vocab}, "
          f"LoRA r {spec['lora_r']}), batch {spec['batch']} x {spec['tokens']} completion "
          f"tokens, prompts {spec['prompt']} / {2 * spec['prompt']} (student / teacher, "
          f"views, negative), {args.device} {args.dtype}; seconds per step, mean of "
          f"{args.steps} after one warm-up")
    print(table(bench, rows))
    compared = [compare(bench, m) for m in args.methods.split(",") if "@" in m] \
        if args.compare else []
    if compared:
        print("\n| method | loss full | loss adaptive | loss rel. diff | grad rel. diff | "
              "view tokens run | mass covered |\n|---|---|---|---|---|---|---|")
        for c in compared:
            print(f"| {c['method']} | {c['loss_full']:.6g} | {c['loss_adaptive']:.6g} | "
                  f"{c['loss_rel_diff']:.2e} | {c['grad_rel_diff']:.2e} | "
                  f"{c['view_token_frac']:.0%} | {c['covered']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows + compared:
                f.write(json.dumps({"shape": args.shape, "layers": bench.layers, **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
