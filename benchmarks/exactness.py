"""Exactness against float64, in two regimes (docs/losses.md): the error tables.

near: student = teacher + eps * N(0, 1) (teacher N(0, 2^2)), where D is small and the
    textbook formulas cancel; per-token D relative error (median / max) and the relative
    error of the logits gradient in norm. At eps = 0 the truth is 0, so the table shows
    max |D| and max |grad|.
unrelated: independent student and teacher logits, N(0, s^2) with the row scales s of
    ``UNRELATED_SCALES`` on each side (equal, and 8x apart either way), for every alpha of
    the jsd; max per-token D relative error, batch loss and gradient relative errors.
Labels uniform, kd-only config at tau = 0.7, against the float64 reference of the same
inputs, for every impl: ``eager`` (benchmarks/eager.py), ``torch``, ``torch-stream`` (the
PyTorch path with its small-input path off), ``triton`` (CUDA, or the interpreter on CPU),
``reference-fp32`` and ``textbook-fp32`` (the textbook formula of docs/losses.md in float32,
its gradient by autograd: the plain-fp32 baseline every impl must match on unrelated rows).

    python -m benchmarks.exactness                      # near, B=2, T=33, V=32000, fp32
    python -m benchmarks.exactness --regime unrelated --impls torch,textbook-fp32
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
from unisd_fast.reference import textbook_divergence  # noqa: E402

from .eager import eager_unisd_loss  # noqa: E402

EPS = (0.05, 0.01, 0.002, 0.0)
ALPHAS = (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999)
# (student, teacher) logit scales of the unrelated rows, cycled over the rows
UNRELATED_SCALES = ((1.0, 1.0), (4.0, 4.0), (1.0, 8.0), (8.0, 1.0))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("eager", "torch", "triton", "reference-fp32")
UNRELATED_IMPLS = ("torch", "torch-stream", "triton", "reference-fp32", "textbook-fp32")


def close_inputs(B, T, V, eps, dtype=torch.float32, seed=0, device="cpu"):
    """Teacher logits N(0, 2^2), student = teacher + eps * N(0, 1), labels, in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, T, V, generator=gen) * 2
    student = teacher + eps * torch.randn(B, T, V, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    return student.to(device, dtype), teacher.to(device, dtype), labels.to(device)


def unrelated_inputs(B, T, V, dtype=torch.float32, seed=0, device="cpu"):
    """Independent student and teacher logits N(0, 1) times the row scales
    ``UNRELATED_SCALES`` (cycled over the B * T rows), labels, in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor(UNRELATED_SCALES).repeat(B * T // len(UNRELATED_SCALES) + 1, 1)
    scales = scales[:B * T].view(B, T, 2, 1)
    student = torch.randn(B, T, V, generator=gen) * scales[:, :, 0]
    teacher = torch.randn(B, T, V, generator=gen) * scales[:, :, 1]
    labels = torch.randint(0, V, (B, T), generator=gen)
    return student.to(device, dtype), teacher.to(device, dtype), labels.to(device)


def _backend(impl):
    if impl == "torch-stream":
        from unisd_fast.backends.pytorch import TorchBackend

        return TorchBackend(small_elements=0)
    return "reference" if impl == "reference-fp32" else impl


def loss_divergence_and_grad(student, teacher, labels, cfg, impl):
    """(loss, per-token D, d loss / d student), all float64, of ``impl`` on these inputs
    (``textbook-fp32``: the mean of the textbook D, for inputs with no ignored label)."""
    z = student.clone().requires_grad_()
    if impl == "textbook-fp32":
        d = textbook_divergence(z.float(), teacher.float(), cfg.divergence, cfg.temperature,
                                cfg.jsd_alpha)
        loss = cfg.kd_weight * d.mean()
    elif impl == "eager":
        out = eager_unisd_loss(z, teacher, labels, config=cfg)
        loss, d = out.loss, out.token_divergence
    else:
        out = usd.unisd_loss(z, teacher, labels, config=cfg, impl=_backend(impl))
        loss, d = out.loss, out.token_divergence
    loss.backward()
    return loss.detach().double(), d.detach().double(), z.grad.double()


def divergence_and_grad(student, teacher, labels, cfg, impl):
    """(per-token D, d loss / d student), both float64, of ``impl`` on these inputs."""
    return loss_divergence_and_grad(student, teacher, labels, cfg, impl)[1:]


def _float64(student, teacher, labels, cfg):
    return loss_divergence_and_grad(student.double(), teacher.double(), labels, cfg,
                                    "reference")


def errors(student, teacher, labels, cfg, impl):
    """(per-token relative error of D, relative error of the gradient in norm, max |D|,
    max |grad|) of ``impl`` against float64 of the same inputs."""
    _, d64, g64 = _float64(student, teacher, labels, cfg)
    d, g = divergence_and_grad(student, teacher, labels, cfg, impl)
    rel_d = (d - d64).abs() / d64.abs().clamp_min(1e-300)
    rel_g = ((g - g64).norm() / g64.norm().clamp_min(1e-300)).item()
    return rel_d, rel_g, d.abs().max().item(), g.abs().max().item()


def all_errors(student, teacher, labels, cfg, impl, exact=None):
    """{"D": max per-token relative error of D, "loss": relative error of the loss,
    "grad": relative error of the gradient in norm} of ``impl`` against float64 (``exact``:
    the float64 (loss, D, grad) of these inputs, computed when not given)."""
    l64, d64, g64 = exact if exact is not None else _float64(student, teacher, labels, cfg)
    loss, d, g = loss_divergence_and_grad(student, teacher, labels, cfg, impl)
    return {"D": ((d - d64).abs() / d64.abs()).max().item(),
            "loss": ((loss - l64).abs() / l64.abs()).item(),
            "grad": ((g - g64).norm() / g64.norm()).item()}


def rounding_floor(student, teacher, labels, cfg):
    """Relative error in norm of the float64 gradient rounded to the inputs' dtype: the best
    any implementation writing that dtype can do."""
    _, g64 = divergence_and_grad(student.double(), teacher.double(), labels, cfg, "reference")
    return ((g64.to(student.dtype).double() - g64).norm() / g64.norm()).item()


def configs(divergences, alphas, tau):
    """(divergence, alpha or None, config) for each divergence, jsd at every alpha."""
    for div in divergences:
        for alpha in (alphas if div == "jsd" else (None,)):
            extra = {} if alpha is None else {"jsd_alpha": alpha}
            yield div, alpha, usd.UniSDConfig(divergence=div, temperature=tau, **extra)


def near_table(args, dtype, device):
    print(f"near: B={args.batch} T={args.seq} V={args.vocab} tau={args.tau} {args.dtype} on "
          f"{device}; D rel err median / max, grad rel err (norm); eps=0: max|D|, max|grad|")
    print("| divergence | alpha | eps | median D | impl | D rel err median | D rel err max | "
          "grad rel err | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for div, alpha, cfg in configs(args.divergences.split(","), args.alphas, args.tau):
        for eps in (float(e) for e in args.eps.split(",")):
            inputs = close_inputs(args.batch, args.seq, args.vocab, eps, dtype, device=device)
            d64, _ = divergence_and_grad(*(x.double() if x.is_floating_point() else x
                                           for x in inputs), cfg, "reference")
            floor = "" if dtype == torch.float32 else \
                f" (floor {rounding_floor(*inputs, cfg):.1e})"
            for impl in args.impls.split(","):
                start = time.perf_counter()
                rel_d, rel_g, d_max, g_max = errors(*inputs, cfg, _backend(impl)
                                                    if impl == "torch-stream" else impl)
                took = time.perf_counter() - start
                if eps == 0:
                    cells = f"max|D| {d_max:.1e} | - | max|grad| {g_max:.1e}"
                else:
                    cells = f"{rel_d.median():.1e} | {rel_d.max():.1e} | {rel_g:.1e}{floor}"
                print(f"| {div} | {alpha or '-'} | {eps} | {d64.median():.1e} | {impl} | "
                      f"{cells} | {took:.1f} |", flush=True)


def unrelated_table(args, dtype, device):
    print(f"unrelated: B={args.batch} T={args.seq} V={args.vocab} tau={args.tau} "
          f"{args.dtype} on {device}, row scales (student, teacher) {UNRELATED_SCALES}; "
          "relative errors vs float64 (grad in norm); / textbook: the impl's error over "
          "textbook-fp32's")
    print("| divergence | alpha | impl | D rel err max | loss rel err | grad rel err | "
          "/ textbook (D, loss, grad) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    inputs = unrelated_inputs(args.batch, args.seq, args.vocab, dtype, device=device)
    for div, alpha, cfg in configs(args.divergences.split(","), args.alphas, args.tau):
        exact = _float64(*inputs, cfg)
        base = all_errors(*inputs, cfg, "textbook-fp32", exact)
        for impl in args.impls.split(","):
            start = time.perf_counter()
            err = all_errors(*inputs, cfg, impl, exact)
            took = time.perf_counter() - start
            ratio = ", ".join(f"{err[k] / max(base[k], 1e-300):.2f}" for k in err)
            print(f"| {div} | {alpha or '-'} | {impl} | {err['D']:.1e} | {err['loss']:.1e} | "
                  f"{err['grad']:.1e} | {ratio} | {took:.1f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regime", choices=("near", "unrelated"), default="near")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=33)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tau", type=float, default=0.7)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--divergences", default="fkl,rkl,jsd")
    parser.add_argument("--alphas", type=lambda s: [float(a) for a in s.split(",")],
                        default=None, help="jsd alphas (near: 0.5; unrelated: "
                        f"{','.join(map(str, ALPHAS))})")
    parser.add_argument("--impls", default=None, help=f"near: {','.join(IMPLS)}; "
                        f"unrelated: {','.join(UNRELATED_IMPLS)}")
    parser.add_argument("--eps", default=",".join(str(e) for e in EPS))
    args = parser.parse_args(argv)
    near = args.regime == "near"
    args.alphas = args.alphas or ([0.5] if near else list(ALPHAS))
    args.impls = args.impls or ",".join(IMPLS if near else UNRELATED_IMPLS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    (near_table if near else unrelated_table)(args, DTYPES[args.dtype], device)


if __name__ == "__main__":
    main()
