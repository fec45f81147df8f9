"""Accuracy when the student is close to the teacher (docs/losses.md): the error table.

student = teacher + eps * N(0, 1) (teacher N(0, 2^2)), labels uniform, kd-only config at
tau = 0.7, against the float64 reference of the same inputs; per-token D relative error
(median / max) and the relative error of the logits gradient in norm, for every impl:
``eager`` (benchmarks/eager.py), ``torch``, ``triton`` (CUDA, or the interpreter on CPU) and
``reference-fp32``. At eps = 0 the truth is 0, so the table shows max |D| and max |grad|.

    python -m benchmarks.exactness                      # B=2, T=33, V=32000, fp32
    python -m benchmarks.exactness --vocab 4099 --impls torch,triton --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton kernels

import unisd_fast as usd  # noqa: E402

from .eager import eager_unisd_loss  # noqa: E402

EPS = (0.05, 0.01, 0.002, 0.0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("eager", "torch", "triton", "reference-fp32")


def close_inputs(B, T, V, eps, dtype=torch.float32, seed=0, device="cpu"):
    """Teacher logits N(0, 2^2), student = teacher + eps * N(0, 1), labels, in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, T, V, generator=gen) * 2
    student = teacher + eps * torch.randn(B, T, V, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    return student.to(device, dtype), teacher.to(device, dtype), labels.to(device)


def divergence_and_grad(student, teacher, labels, cfg, impl):
    """(per-token D, d loss / d student), both float64, of ``impl`` on these inputs."""
    z = student.clone().requires_grad_()
    if impl == "eager":
        out = eager_unisd_loss(z, teacher, labels, config=cfg)
    else:
        name = "reference" if impl == "reference-fp32" else impl
        out = usd.unisd_loss(z, teacher, labels, config=cfg, impl=name)
    out.loss.backward()
    return out.token_divergence.double(), z.grad.double()


def errors(student, teacher, labels, cfg, impl):
    """(per-token relative error of D, relative error of the gradient in norm, max |D|,
    max |grad|) of ``impl`` against float64 of the same inputs."""
    d64, g64 = divergence_and_grad(student.double(), teacher.double(), labels, cfg,
                                   "reference")
    d, g = divergence_and_grad(student, teacher, labels, cfg, impl)
    rel_d = (d - d64).abs() / d64.abs().clamp_min(1e-300)
    rel_g = ((g - g64).norm() / g64.norm().clamp_min(1e-300)).item()
    return rel_d, rel_g, d.abs().max().item(), g.abs().max().item()


def rounding_floor(student, teacher, labels, cfg):
    """Relative error in norm of the float64 gradient rounded to the inputs' dtype: the best
    any implementation writing that dtype can do."""
    _, g64 = divergence_and_grad(student.double(), teacher.double(), labels, cfg, "reference")
    return ((g64.to(student.dtype).double() - g64).norm() / g64.norm()).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=33)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tau", type=float, default=0.7)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--divergences", default="fkl,rkl,jsd")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--eps", default=",".join(str(e) for e in EPS))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    print(f"B={args.batch} T={args.seq} V={args.vocab} tau={args.tau} {args.dtype} on "
          f"{device}; D rel err median / max, grad rel err (norm); eps=0: max|D|, max|grad|")
    print("| divergence | eps | median D | impl | D rel err median | D rel err max | "
          "grad rel err | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for div in args.divergences.split(","):
        cfg = usd.UniSDConfig(divergence=div, temperature=args.tau)
        for eps in (float(e) for e in args.eps.split(",")):
            inputs = close_inputs(args.batch, args.seq, args.vocab, eps, dtype, device=device)
            d64, _ = divergence_and_grad(*(x.double() if x.is_floating_point() else x
                                           for x in inputs), cfg, "reference")
            floor = "" if dtype == torch.float32 else \
                f" (floor {rounding_floor(*inputs, cfg):.1e})"
            for impl in args.impls.split(","):
                start = time.perf_counter()
                rel_d, rel_g, d_max, g_max = errors(*inputs, cfg, impl)
                took = time.perf_counter() - start
                if eps == 0:
                    cells = f"max|D| {d_max:.1e} | - | max|grad| {g_max:.1e}"
                else:
                    cells = f"{rel_d.median():.1e} | {rel_d.max():.1e} | {rel_g:.1e}{floor}"
                print(f"| {div} | {eps} | {d64.median():.1e} | {impl} | {cells} | "
                      f"{took:.1f} |", flush=True)


if __name__ == "__main__":
    main()
