"""The step ledger (benchmarks/step_ledger.py, step_flops.py) and the phase timer."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import step_flops, step_ledger  # noqa: E402
from unisd_fast.train.phases import PhaseTimer, phase  # noqa: E402


def test_phase_timer_sums_each_phase():
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer("a"):
            time.sleep(0.01)
    with phase(timer, "b"):
        pass
    with phase(None, "c"):
        pass
    assert timer.seconds["a"] >= 0.02 and set(timer.seconds) == {"a", "b"}


def test_ledger_times_every_phase_a_method_runs(tmp_path, capsys):
    out = tmp_path / "ledger.jsonl"
    step_ledger.main(["--shape", "tiny", "--batch", "4", "--steps", "1", "--methods",
                      "sft,sd,unisd_star@0.5", "--compare", "--json", str(out)])
    rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())
            if "seconds" in r}
    ran = {m: {p for p, s in r["seconds"].items() if s > 0 and p != "step"}
           for m, r in rows.items()}
    assert ran["sft"] == {"student_forward", "loss", "student_backward", "optimizer"}
    assert {"sampling", "teacher", "views", "negative", "selection", "ema"} <= \
        ran["unisd_star@0.5"]
    assert "views" not in ran["sd"] and "selection" not in ran["sd"]
    for r in rows.values():
        s = r["seconds"]
        assert sum(s[p] for p in step_ledger.PHASES) <= s["step"] * 1.001
    assert 0 < rows["unisd_star@0.5"]["view_token_frac"] < 1
    table = capsys.readouterr().out
    assert "| unisd_star@0.5 |" in table and "grad rel. diff" in table


def test_flop_counts_add_up():
    m = step_flops.MODELS["qwen2.5-0.5b"]
    whole = step_flops.decoder_flops(m, 300)
    assert whole == pytest.approx(step_flops.decoder_flops(m, 100)
                                  + step_flops.decoder_flops(m, 200, 100))
    args = (m, 4, 48, 96, 256, 3, True)
    row = {meth: step_flops.phases(m, meth, *args[1:], 1.0, 10) for meth in step_flops.METHODS}
    assert row["sd"] == row["gkd"]
    total = {k: sum(v.values()) for k, v in row.items()}
    assert total["sd"] < total["agreement"] < total["unisd_star"]
    # adaptive at a view fraction of 1 is full agreement plus the selection pass
    full = dict(row["unisd_star@adaptive"], selection=0.0)
    assert full == pytest.approx(row["unisd_star"])
    cut = step_flops.phases(m, "unisd_star@adaptive", *args[1:], 0.3, 10)
    assert cut["views"] == pytest.approx(0.3 * row["unisd_star"]["views"])
