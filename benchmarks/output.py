"""Where a benchmark writes: a scratch folder by default, the committed results only when
asked. ``--out DIR`` wins; ``--update-results`` writes into ``benchmarks/results/<name>``
(what the README and the results' READMEs cite); otherwise ``out/benchmarks/<name>``
(ignored by git), so that a newcomer's run never overwrites the committed figures."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_output_arguments(ap, name: str) -> None:
    """``--out`` and ``--update-results`` on the parser ``ap`` of the benchmark ``name``
    (a folder name; "<device>" in it is replaced by the device)."""
    ap.add_argument("--out", default=None,
                    help=f"output folder (default out/benchmarks/{name}, a scratch folder)")
    ap.add_argument("--update-results", action="store_true",
                    help=f"write into the committed benchmarks/results/{name} instead")


def output_dir(opts, name: str, device: str) -> str:
    """The folder the run writes into, created."""
    name = name.replace("<device>", device)
    if opts.out:
        out = Path(opts.out)
    elif opts.update_results:
        out = ROOT / "benchmarks" / "results" / name
    else:
        out = ROOT / "out" / "benchmarks" / name
    os.makedirs(out, exist_ok=True)
    return str(out)
