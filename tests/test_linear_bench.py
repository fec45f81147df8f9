"""Smoke test of the fused-linear benchmark (benchmarks/linear.py) on a tiny shape: every
provider runs, the table and CSV are written, and the fused-linear loss and d hidden agree
with materialise-then-eager's."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from benchmarks.linear import main  # noqa: E402

FAST = "materialise-eager,materialise-unisd,linear"


@pytest.mark.parametrize("providers", [
    FAST, pytest.param(FAST + ",liger", marks=pytest.mark.slow)])  # liger compiles: minutes
def test_linear_benchmark_runs_every_provider(tmp_path, providers):
    main(["--device", "cpu", "--in-process", "--batch", "2", "--seq", "4", "--hidden", "16",
          "--vocab", "1001", "--reps", "1", "--warmup", "0", "--out", str(tmp_path),
          "--providers", providers])
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    status = {(r["preset"], r["head"], r["provider"]): r["status"] for r in rows}
    assert len(status) == 4 * len(providers.split(","))
    for (preset, _, provider), s in status.items():
        assert s == ("skipped" if provider == "liger" and preset == "unisd_star" else "ok")
    for r in rows:
        if r["provider"] in ("linear", "materialise-unisd"):
            assert float(r["loss_rel_err"]) < 1e-5 and float(r["dh_rel_err"]) < 1e-4
            assert int(r["peak"]) >= 0 and float(r["fwd_bwd_ms"]) > 0
    table = (tmp_path / "table.md").read_text()
    assert "| unisd_star | trainable | linear |" in table
    assert "load_average" in (tmp_path / "machine.md").read_text()
