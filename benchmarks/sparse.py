"""Sparse-support benchmark: the student's top-k loss (TRL SDFT's default
``distillation_mode="topk_logits"``) at an LLM head, forward + backward.

    python -m benchmarks.sparse                  # CPU: Qwen2.5-0.5B head, B=2, T=256, k=100
    python -m benchmarks.sparse --device cuda --tokens 8192 --hidden 3584 --vocab 152064 \\
        --dtype bf16                             # the GPU case (Qwen2.5-7B head)

providers, each in a fresh process of its own (memory, then time, as ``benchmarks.linear``):
  trl-topk      TRL 1.16's ``compute_topk_self_distillation_loss`` on materialised logits
                (student F.linear with autograd, teacher under no_grad, both / temperature),
                then SDFT's per-sequence masked mean
  unisd-sparse  ``unisd_linear_loss`` with ``UniSDConfig(topk=k)``: no logits tensor
  unisd-dense   ``unisd_linear_loss`` over the full vocabulary (the loss TRL's
                ``full_logits`` mode approximates)
One lm_head shared by student and teacher (self-distillation: the same model in another
context), frozen unless ``--trainable``; peak memory above the inputs (the head's gradient,
when trainable, counts for every provider). ``--tail`` adds the tail bucket.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

PROVIDERS = ("trl-topk", "unisd-sparse", "unisd-dense")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MB = 2**20


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=None, help="B * T (default B x 256)")
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--tail", action="store_true")
    p.add_argument("--trainable", action="store_true", help="the head requires grad")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_inputs(opts, device):
    """Teacher hidden states N(0, 1), the student's near them, one head of logits of std
    about 2, labels with 10% ignored; deterministic."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[opts.dtype]
    N, H, V = opts.tokens, opts.hidden, opts.vocab
    B = opts.batch
    T = N // B

    def normal(*shape, std=1.0):
        return torch.empty(shape, device=device).normal_(0.0, std, generator=gen).to(dtype)

    ht = normal(B, T, H)
    hs = (ht.float() + normal(B, T, H, std=0.1).float()).to(dtype).requires_grad_()
    weight = normal(V, H, std=2.0 / H ** 0.5).requires_grad_(opts.trainable)
    labels = torch.randint(0, V, (B, T), device=device, generator=gen)
    labels[torch.rand(B, T, device=device, generator=gen) < 0.1] = -100
    return {"student_hidden": hs, "teacher_hidden": ht, "weight": weight, "labels": labels}


def provider(name, opts):
    """loss = fn(inputs) of provider ``name``."""
    import unisd_fast as usd

    tau, k = opts.temperature, opts.topk
    if name == "trl-topk":
        from trl.experimental.sdft.loss_utils import compute_topk_self_distillation_loss

        def trl(x):
            z = F.linear(x["student_hidden"], x["weight"]) / tau
            with torch.no_grad():
                u = F.linear(x["teacher_hidden"], x["weight"]) / tau
            per_token = compute_topk_self_distillation_loss(
                z, u, distillation_topk=k, distillation_alpha=0.0,
                distillation_add_tail=opts.tail)
            mask = (x["labels"] != -100).to(per_token.dtype)
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        return trl
    cfg = usd.UniSDConfig(temperature=tau, tail_bucket=opts.tail,
                          topk=k if name == "unisd-sparse" else None)

    def ours(x):
        return usd.unisd_linear_loss(x["student_hidden"], x["weight"], x["teacher_hidden"],
                                     x["weight"], x["labels"], config=cfg).loss
    return ours


def one_rep(fn, inputs, memory, clock):
    for t in (inputs["student_hidden"], inputs["weight"]):
        t.grad = None
    clock.sync()
    base = memory.reset()
    t0 = clock.mark()
    loss = fn(inputs)
    loss.backward()
    t1 = clock.mark()
    clock.sync()
    return clock.ms(t0, t1), memory.peak() - base, float(loss.detach())


def worker(name, opts) -> dict:
    """Memory first (glibc's mmap threshold pinned from the start), then time."""
    from .measure import GLIBC_MMAP, SMALL_MMAP, pin_malloc, tools_for, trim_heap

    device = torch.device(opts.device)
    if device.type == "cpu":
        pin_malloc(SMALL_MMAP)
    clock, memory = tools_for(device)
    inputs = make_inputs(opts, device)
    fn = provider(name, opts)
    for _ in range(opts.warmup):
        one_rep(fn, inputs, memory, clock)
    gc.collect()
    trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _, peak, loss = one_rep(fn, inputs, memory, clock)
    if device.type == "cpu":
        pin_malloc(GLIBC_MMAP)
    times = [one_rep(fn, inputs, memory, clock)[0] for _ in range(opts.reps)]
    grad = inputs["student_hidden"].grad.float()
    return {"provider": name, "ms": statistics.median(times), "peak_mib": max(peak, 0) / MB,
            "loss": loss, "grad_norm": grad.norm().item()}


def main(argv=None) -> None:
    opts = parse(argv)
    opts.tokens = opts.tokens or opts.batch * 256
    if opts.worker:
        print(json.dumps(worker(opts.worker, opts)))
        return
    args = [a for a in (argv if argv is not None else sys.argv[1:])]
    records = []
    for name in opts.providers.split(","):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "benchmarks.sparse", *args, "--worker",
                               name], capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            records.append({"provider": name, "error": done.stderr.strip().splitlines()[-1]})
        else:
            records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        records[-1]["wall_s"] = time.perf_counter() - t0
    print(table(records, opts))


def table(records, opts) -> str:
    base = next((r for r in records if r["provider"] == "trl-topk" and "ms" in r), None)
    head = "trainable" if opts.trainable else "frozen"
    lines = [f"B*T={opts.tokens} H={opts.hidden} V={opts.vocab} k={opts.topk} {opts.dtype} "
             f"{opts.device} fwd+bwd, {head} head, tail={opts.tail}",
             "| provider | time ms | peak MiB above inputs | time / trl | mem / trl | loss |",
             "|---|---|---|---|---|---|"]
    for r in records:
        if "ms" not in r:
            lines.append(f"| {r['provider']} | error: {r['error']} | | | | |")
            continue
        rt = f"{r['ms'] / base['ms']:.2f}" if base else ""
        rm = f"{r['peak_mib'] / base['peak_mib']:.2f}" if base else ""
        lines.append(f"| {r['provider']} | {r['ms']:.0f} | {r['peak_mib']:.0f} | {rt} | {rm} "
                     f"| {r['loss']:.6f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
