"""Sweep runner: ``python -m benchmarks [--device cpu|cuda] [...]`` from the repository root.

Writes into --out: results.csv (one row per provider, mode, shape, dtype and metric),
table.md (the markdown table, also printed), plot_<preset>_<dtype>_<mode>.png and
machine.md. ``--report CSV`` regenerates the table and plots from an existing CSV.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from .output import add_output_arguments, output_dir


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


DEFAULTS = {
    "cpu": {"vocab": "8192,32000", "tokens": "256,1024", "dtype": "fp32", "reps": 5,
            "warmup": 1},
    "cuda": {"vocab": "32000,128256,151936", "tokens": "1024,4096,16384", "dtype": "bf16",
             "reps": 10, "warmup": 2},
}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--providers", type=_names, default=None,
                    help="comma list of eager,compile,compile-dynamic,unisd,unisd-torch,"
                         "unisd-triton,unisd-stream,liger "
                         "(default: cpu eager,compile,unisd,unisd-triton,liger; "
                         "cuda eager,compile,unisd,unisd-torch,liger)")
    ap.add_argument("--presets", type=_names, default=["sd", "unisd_star"],
                    help="comma list of UniSDConfig presets (default sd,unisd_star)")
    ap.add_argument("--vocab", type=_ints, default=None,
                    help=f"vocab sizes (default cpu {DEFAULTS['cpu']['vocab']}; "
                         f"cuda {DEFAULTS['cuda']['vocab']})")
    ap.add_argument("--tokens", type=_ints, default=None,
                    help=f"tokens B*T (default cpu {DEFAULTS['cpu']['tokens']}; "
                         f"cuda {DEFAULTS['cuda']['tokens']})")
    ap.add_argument("--batch", type=int, default=4, help="B; T = tokens / B (default 4)")
    ap.add_argument("--hidden", type=int, default=256, help="H of the hidden states")
    ap.add_argument("--views", type=int, default=3, help="K agreement views")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="logits dtype (default cpu fp32, cuda bf16)")
    ap.add_argument("--modes", type=_names, default=["fwd", "bwd", "fwd_bwd"],
                    help="comma list of fwd,bwd,fwd_bwd")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (cpu 5, cuda 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first runs (cpu 1, cuda 2)")
    ap.add_argument("--grid", choices=("star", "cross"), default="star",
                    help="star: vocab sweep at the anchor tokens + tokens sweep at the anchor "
                         "vocab; cross: every combination")
    ap.add_argument("--anchor-vocab", type=int, default=None, help="default: largest --vocab")
    ap.add_argument("--anchor-tokens", type=int, default=None,
                    help="default: largest --tokens")
    add_output_arguments(ap, "<device>")
    ap.add_argument("--no-errors", dest="errors", action="store_false",
                    help="skip the float64 reference and the error metrics")
    ap.add_argument("--in-process", action="store_true",
                    help="CPU: run every provider in this process (faster; its memory "
                         "figures are then only approximate)")
    ap.add_argument("--interpret-max", type=int, default=2**16,
                    help="CPU: largest tokens x vocab for the Triton-interpreted providers "
                         "(unisd-triton, liger), which run with --reps 1 --warmup 0 there")
    ap.add_argument("--interpret-case", type=_ints, default=[64, 1024], metavar="TOKENS,VOCAB",
                    help="CPU: the tiny shape added for the interpreted providers "
                         "(default 64,1024)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; cases not started by then are reported as skipped")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--first-call", action="store_true",
                    help="CPU: also measure each case's first call in a process of its own "
                         "(compile or load included): first_time_ms, first_mem_mb, and a "
                         "table of first call against steady state")
    ap.add_argument("--report", metavar="CSV", default=None,
                    help="only rebuild table.md and plots from this CSV")
    opts = ap.parse_args(argv)
    return opts


def _finish_defaults(opts) -> None:
    import torch

    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    d = DEFAULTS[opts.device]
    opts.vocab = opts.vocab or _ints(d["vocab"])
    opts.tokens = opts.tokens or _ints(d["tokens"])
    opts.dtype = opts.dtype or d["dtype"]
    opts.reps = opts.reps if opts.reps is not None else d["reps"]
    opts.warmup = opts.warmup if opts.warmup is not None else d["warmup"]
    if opts.providers is None:
        from .providers import CPU_DEFAULT, CUDA_DEFAULT

        opts.providers = list(CUDA_DEFAULT if opts.device == "cuda" else CPU_DEFAULT)
    opts.out = output_dir(opts, "<device>", opts.device)
    opts.deadline = time.time() + opts.time_budget if opts.time_budget else None
    bad = [m for m in opts.modes if m not in ("fwd", "bwd", "fwd_bwd")]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; expected fwd, bwd, fwd_bwd")


def _report(rows, out: str, modes) -> str:
    from .report import markdown_table, plots

    table = markdown_table(rows, modes)
    summary = markdown_table(rows, ["fwd_bwd"]) if "fwd_bwd" in modes and len(modes) > 1 else ""
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    for path in plots(rows, out, modes):
        print(f"plot: {path}")
    return table + ("\nforward+backward only:\n\n" + summary if summary else "")


def main(argv=None) -> None:
    opts = parse(argv)
    if opts.report:
        from .report import MODES, read_csv

        out = opts.out or os.path.dirname(opts.report) or "."
        print(_report(read_csv(opts.report), out, list(MODES)))
        return
    import torch

    if not torch.cuda.is_available():
        # Without CUDA, Triton runs only in its interpreter; set before any Triton import.
        # (Not on a CUDA machine: that would turn later Triton imports of this process into
        # interpreted ones; there the CPU worker processes set it for themselves.)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _finish_defaults(opts)

    from .env import environment, machine_markdown
    from .measure import GLIBC_MMAP, pin_malloc
    from .report import write_csv
    from .sweep import build_cases, run_inprocess, run_isolated

    if opts.threads:
        torch.set_num_threads(opts.threads)
    os.makedirs(opts.out, exist_ok=True)
    from .providers import INTERPRETED

    extra = []
    if opts.device == "cpu" and set(opts.providers) & set(INTERPRETED) and opts.interpret_case:
        extra.append(tuple(opts.interpret_case))
    cases = build_cases(opts.presets, opts.vocab, opts.tokens, batch=opts.batch,
                        dtype=opts.dtype, hidden=opts.hidden, views=opts.views, grid=opts.grid,
                        anchor_vocab=opts.anchor_vocab, anchor_tokens=opts.anchor_tokens,
                        extra=extra)
    env = environment(torch.device(opts.device))
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in
                                                 (sys.argv[1:] if argv is None else argv))
    with open(os.path.join(opts.out, "machine.md"), "w") as f:
        f.write(machine_markdown(env, command))
    print(f"{len(cases)} cases x {len(opts.providers)} providers on {env['machine']}; "
          f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    if opts.first_call and (opts.device != "cpu" or opts.in_process):
        raise SystemExit("--first-call needs the CPU worker processes (no --in-process)")
    if opts.device == "cpu" and not opts.in_process:
        rows = run_isolated(cases, opts.providers, opts, env)
    else:
        pin_malloc(GLIBC_MMAP)
        rows = run_inprocess(cases, opts.providers, opts, env)
    csv_path = os.path.join(opts.out, "results.csv")
    write_csv(rows, csv_path)
    print(f"csv: {csv_path}")
    print(_report(rows, opts.out, opts.modes))
    if opts.first_call:
        from .report import first_call_table

        print("first call (a fresh process per provider and case) against steady state:\n")
        print(first_call_table(rows, opts.modes))


if __name__ == "__main__":
    main()
