"""Each Triton kernel timed alone and the whole loss forward+backward, as a share of a device
copy of the same bytes measured in the same run.

    python -m benchmarks.gpu_kernels [--device cuda] [--tokens 8192] [--vocab 151936]
                                     [--dtype bf16] [--presets sd,gkd,unisd_star]
                                     [--reps 10] [--out DIR]

Bytes are the design budget of docs/kernels.md ("Byte budget"): the stats pass reads the
student and teacher once (jsd twice), each label pass one view or the negative, the gradient
pass reads both and writes the gradient; the whole loss adds them up. The copy is
``dst.copy_(src)`` of a buffer of 2 GiB (a read and a write of each byte), the best a
streaming kernel can do on the device. Times are medians over --reps after two warm-ups
(CUDA events; perf_counter on CPU, where the kernels run in Triton's interpreter and the
times mean nothing). Writes kernels.md and kernels.csv into --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

import unisd_fast as usd
from benchmarks.inputs import DTYPES
from benchmarks.output import add_output_arguments, output_dir
from unisd_fast.backends.triton import default_backend

VIEWS = 3


def timer(device: torch.device, reps: int):
    """``timed(fn) -> median seconds`` of ``fn()`` over ``reps`` after two warm-ups."""
    def timed(fn):
        for _ in range(2):
            fn()
        out = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                out.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
        return statistics.median(out)
    return timed


def copy_bandwidth(device, timed, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src))


def preset_rows(preset, opts, device, timed):
    """(step, seconds, bytes) of each kernel alone and of the whole loss, for one preset."""
    cfg = usd.UniSDConfig.preset(preset)
    dt = DTYPES[opts.dtype]
    B, T, V = 1, opts.tokens, opts.vocab
    isz = torch.empty((), dtype=dt).element_size()
    tv = B * T * V * isz
    z = torch.randn(B, T, V, device=device).mul_(2).to(dt)
    u = (z.float() + 0.5 * torch.randn(B, T, V, device=device)).to(dt)
    y = torch.randint(0, V, (B, T), device=device)
    backend = default_backend()
    div, tau, alpha = cfg.divergence, cfg.temperature, cfg.jsd_alpha
    reads = 4 if div == "jsd" else 2
    stats = backend.row_stats(z, u, y, divergence=div, tau=tau, alpha=alpha,
                              ignore_index=cfg.ignore_index)
    ck = torch.full((B, T), 1.0 / T, device=device)
    cc = torch.zeros((B, T), device=device)
    out = torch.empty_like(z)
    rows = [
        ("stats", timed(lambda: backend.row_stats(z, u, y, divergence=div, tau=tau,
                                                  alpha=alpha, ignore_index=cfg.ignore_index)),
         reads * tv),
        ("grad", timed(lambda: backend.write_grad(z, u, y, out, stats, ck, cc, divergence=div,
                                                  tau=tau, alpha=alpha)), 3 * tv),
    ]
    extra = {}
    budget = (reads + 3) * tv
    if cfg.agreement != "none":
        extra["view_logits"] = torch.stack([u] * VIEWS)
        budget += VIEWS * tv
    if cfg.contrastive_weight:
        extra["negative_logits"] = u.flip(-1)
        budget += tv
    if extra:
        rows.append(("label (one view)", timed(lambda: backend.label_logprob(
            u, y, tau=cfg.view_temperature, ignore_index=cfg.ignore_index)), tv))
    if cfg.feature_weight:
        extra["student_hidden"] = torch.randn(B, T, 256, device=device, requires_grad=True)
        extra["teacher_hidden"] = torch.randn(B, T, 256, device=device)
    zg = z.detach().clone().requires_grad_()

    def loss_fwd_bwd():
        zg.grad = None
        usd.unisd_loss(zg, u, y, config=cfg, **extra).loss.backward()

    rows.append(("loss fwd+bwd", timed(loss_fwd_bwd), budget))
    return rows


def headline_parser(doc: str) -> argparse.ArgumentParser:
    """The GPU check's parser: device and the headline shape (8192 x 151936, bf16)."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    return ap


def main(argv=None) -> int:
    ap = headline_parser(__doc__)
    ap.add_argument("--presets", default="sd,gkd,unisd_star")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--copy-bytes", type=int, default=2 << 30)
    add_output_arguments(ap, "gpu-kernels")
    opts = ap.parse_args(argv)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timed = timer(device, opts.reps)
    copy = copy_bandwidth(device, timed, opts.copy_bytes)
    lines = [f"{opts.tokens} tokens x V = {opts.vocab}, {opts.dtype}, {device}; device copy "
             f"{copy / 1e9:.0f} GB/s (read + write of {opts.copy_bytes / 2**30:g} GiB).", "",
             "| preset | step | ms | GB moved | GB/s | share of copy |",
             "|---|---|---|---|---|---|"]
    records = []
    for preset in opts.presets.split(","):
        for step, seconds, nbytes in preset_rows(preset, opts, device, timed):
            rate = nbytes / seconds
            records.append({"preset": preset, "step": step, "ms": 1e3 * seconds,
                            "gb": nbytes / 1e9, "gbs": rate / 1e9, "share": rate / copy})
            lines.append(f"| {preset} | {step} | {1e3 * seconds:.2f} | {nbytes / 1e9:.2f} | "
                         f"{rate / 1e9:.0f} | {100 * rate / copy:.0f}% |")
            print(lines[-1], flush=True)
    folder = output_dir(opts, "gpu-kernels", device.type)
    with open(os.path.join(folder, "kernels.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "kernels.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
