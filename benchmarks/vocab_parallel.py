"""Vocabulary-parallel fused-linear loss: ``python -m benchmarks.vocab_parallel [...]``.

Bytes communicated per token and time per step (forward + backward) of
``unisd_linear_loss(..., vocab_parallel=group)`` with the heads split over ``--ranks``
processes (torchrun, gloo on CPU, nccl on CUDA), next to the same loss in one process on the
whole head; and the analytic count at the shape of a large model (``--at``, default N = 8192
tokens, V = 152064, H = 8192, 8 ranks) against all-gathering the logits instead.

Bytes are those each rank receives: an all-gather of s bytes per rank brings (R - 1) s, an
all-reduce of S bytes 2 (R - 1) / R S (ring). The measured count wraps the collectives the
loss calls and applies the same rule to the tensors they were given, so it checks the
analytic formula against the calls made. Writes results.json and table.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .output import ROOT, add_output_arguments, output_dir

NAME = "vocab-parallel"
STATS_FLOATS = 8  # RowStats (7) and the label-holding flag, float64, all-gathered per row
JSD_FLOATS = 2  # KL(p_T || M), KL(p_S || M) shard sums, float64, all-reduced per row
SCORE_FLOATS = 3  # lse, label logit, flag per scored row (views, negative), float64
LAYOUT_BYTES = 32  # rows, chunk size, label rows and kept rows per rank, once per call


def gather_bytes(per_rank: int, ranks: int) -> float:
    return (ranks - 1) * per_rank


def reduce_bytes(total: int, ranks: int) -> float:
    return 2 * (ranks - 1) / ranks * total


def analytic(tokens: int, hidden: int, ranks: int, divergence: str, scored: int = 0,
             hidden_grad: bool = True) -> dict:
    """Bytes each rank receives in one call, by what they carry (all rows kept)."""
    out = {
        "layout": gather_bytes(LAYOUT_BYTES, ranks),
        "row stats": gather_bytes(8 * STATS_FLOATS * tokens, ranks),
        "jsd sums": reduce_bytes(8 * JSD_FLOATS * tokens, ranks) if divergence == "jsd"
        else 0.0,
        "scored rows": gather_bytes(8 * SCORE_FLOATS * tokens * scored, ranks),
        "d hidden": reduce_bytes(4 * hidden * tokens, ranks) if hidden_grad else 0.0,
    }
    out["total"] = sum(out.values())
    return out


def logits_gather_bytes(tokens: int, vocab: int, ranks: int, itemsize: int = 2) -> float:
    """The alternative: all-gather the student and teacher logits shards (16-bit)."""
    return 2 * gather_bytes(tokens * (vocab // ranks) * itemsize, ranks)


class Counter:
    """Bytes received by this rank in the collectives called while ``active``."""

    def __init__(self):
        import torch.distributed as dist
        self.dist, self.bytes, self.calls, self.active = dist, 0.0, 0, False
        self._gather, self._reduce = dist.all_gather, dist.all_reduce
        dist.all_gather, dist.all_reduce = self.all_gather, self.all_reduce

    def all_gather(self, parts, x, group=None, **kw):
        if self.active:
            ranks = self.dist.get_world_size(group)
            self.bytes += gather_bytes(x.numel() * x.element_size(), ranks)
            self.calls += 1
        return self._gather(parts, x, group=group, **kw)

    def all_reduce(self, x, op=None, group=None, **kw):
        if self.active:
            ranks = self.dist.get_world_size(group)
            self.bytes += reduce_bytes(x.numel() * x.element_size(), ranks)
            self.calls += 1
        kw = kw if op is None else {**kw, "op": op}
        return self._reduce(x, group=group, **kw)


def _inputs(opts, device, dtype):
    g = torch.Generator().manual_seed(0)
    N, V, H = opts.tokens, opts.vocab, opts.hidden
    ws = (torch.randn(V, H, generator=g) * 0.05).to(device, dtype)
    wt = (ws.float() + torch.randn(V, H, generator=g).to(device) * 0.01).to(dtype)
    hs = torch.randn(1, N, H, generator=g).to(device, dtype)
    ht = (hs.float() + torch.randn(1, N, H, generator=g).to(device) * 0.1).to(dtype)
    labels = torch.randint(0, V, (1, N), generator=g).to(device)
    return hs, ws, ht, wt, labels


def _timed(fn, reps: int, device) -> float:
    times = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def worker(opts) -> None:
    import torch.distributed as dist

    from unisd_fast import UniSDConfig, unisd_linear_loss

    device = torch.device(opts.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    counter = Counter()
    rank, ranks = dist.get_rank(), dist.get_world_size()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[opts.dtype]
    hs, ws, ht, wt, labels = _inputs(opts, device, dtype)
    size, extra = divmod(opts.vocab, ranks)
    start = rank * size + min(rank, extra)
    rows = slice(start, start + size + (rank < extra))
    results = {}
    for divergence in opts.divergences.split(","):
        cfg = UniSDConfig(divergence=divergence)

        def step(weight, teacher, group, cfg=cfg):
            h = hs.detach().requires_grad_()
            w = weight.detach().requires_grad_()
            unisd_linear_loss(h, w, ht, teacher, labels, config=cfg, impl=opts.impl,
                              vocab_parallel=group).loss.backward()

        counter.active = True
        step(ws[rows], wt[rows], dist.group.WORLD)
        counter.active = False
        received = torch.tensor([counter.bytes], dtype=torch.float64, device=device)
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        counter.bytes = 0.0
        split_s = _timed(lambda: step(ws[rows], wt[rows], dist.group.WORLD), opts.reps, device)
        dist.barrier()
        whole_s = _timed(lambda: step(ws, wt, None), opts.reps, device) if rank == 0 else 0.0
        dist.barrier()
        results[divergence] = {"bytes_per_token": received.item() / opts.tokens,
                               "split_step_s": split_s, "whole_step_s": whole_s}
    if rank == 0:
        with open(opts.result, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vocab_parallel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--divergences", default="fkl,jsd")
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--at", default="8192,152064,8192,8",
                    help="tokens,vocab,hidden,ranks of the analytic count")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    add_output_arguments(ap, NAME)
    return ap.parse_args(argv)


def table(opts, measured: dict) -> str:
    N, V, H, R = (int(x) for x in opts.at.split(","))
    lines = [f"## Measured: {opts.ranks} ranks ({opts.device}), N={opts.tokens}, "
             f"V={opts.vocab}, H={opts.hidden}, {opts.dtype}",
             "", "| divergence | bytes/token measured | analytic | step split (s) | "
             "step one process (s) |", "|---|---|---|---|---|"]
    for d, m in measured.items():
        a = analytic(opts.tokens, opts.hidden, opts.ranks, d)["total"] / opts.tokens
        lines.append(f"| {d} | {m['bytes_per_token']:.1f} | {a:.1f} | "
                     f"{m['split_step_s']:.3f} | {m['whole_step_s']:.3f} |")
    lines += ["", f"## Analytic: N={N}, V={V}, H={H}, {R} ranks (bytes each rank receives)",
              "", "| divergence | row stats /token | d hidden /token | total /token | "
              "total per call (MiB) | all-gathering the bf16 logits instead, /token |",
              "|---|---|---|---|---|---|"]
    for d in ("fkl", "rkl", "jsd"):
        a = analytic(N, H, R, d)
        stats = a["row stats"] + a["jsd sums"]
        lines.append(f"| {d} | {stats / N:.0f} | {a['d hidden'] / N:.0f} | {a['total'] / N:.0f}"
                     f" | {a['total'] / 2**20:.1f} | {logits_gather_bytes(N, V, R) / N:.0f} |")
    lines += ["", "d hidden's all-reduce is that of any vocabulary-split head (Megatron's "
              "too); the loss itself adds the row stats."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    opts = parse(argv)
    if opts.worker:
        worker(opts)
        # no interpreter teardown, where a joinable C++ thread now and then aborts a rank
        sys.stdout.flush()
        os._exit(0)
    out = output_dir(opts, NAME, opts.device)
    result = os.path.join(out, "results.json")
    args = [a for a in (argv if argv is not None else sys.argv[1:])
            if a != "--update-results"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={opts.ranks}", "-m", "benchmarks.vocab_parallel", *args,
           "--worker", "--result", result]
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    subprocess.run(cmd, check=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    with open(result) as f:
        measured = json.load(f)
    text = table(opts, measured)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
