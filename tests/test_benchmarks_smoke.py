"""Smoke tests of the benchmark suite (benchmarks/): the eager baseline is the section 2 loss,
and the sweep runs end to end on tiny shapes and writes its CSV, table and plots."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import unisd_fast as usd  # noqa: E402
from benchmarks.__main__ import main as bench_main  # noqa: E402
from benchmarks.eager import compiled_loss, eager_unisd_loss  # noqa: E402
from benchmarks.inputs import Case, byte_budget, detached_copy, make_inputs  # noqa: E402

OPTIONS = [
    ("sd", {}), ("gkd", {}), ("clip", {}), ("agreement", {}), ("contrastive", {}),
    ("match", {}), ("match_repr", {}), ("unisd_star", {}),
    ("unisd_star", {"divergence": "rkl"}), ("unisd_star", {"clip_quantile": 0.8}),
    ("unisd_star", {"clip": 0.3}), ("unisd_star", {"agreement_stat": "range"}),
    ("unisd_star", {"agreement": "sequence", "agreement_gamma": 0.5}),
    ("unisd_star", {"normalize": "token"}), ("gkd", {"jsd_alpha": 0.2}),
]


@pytest.mark.parametrize("preset,overrides", OPTIONS)
def test_eager_baseline_matches_reference(preset, overrides):
    cfg = usd.UniSDConfig.preset(preset, **overrides)
    inputs = make_inputs(Case("unisd_star", 2, 12, 257))
    inputs["labels"][1] = -100  # an all-ignored sequence
    a, b = detached_copy(inputs, torch.float32), detached_copy(inputs, torch.float32)
    mine = eager_unisd_loss(**a, config=cfg)
    ref = usd.unisd_loss(**b, config=cfg, impl="reference")
    mine.loss.backward()
    ref.loss.backward()
    assert float(mine.loss.detach()) == pytest.approx(float(ref.loss.detach()), abs=1e-5,
                                                      rel=1e-5)
    torch.testing.assert_close(a["student_logits"].grad, b["student_logits"].grad,
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a["student_hidden"].grad, b["student_hidden"].grad,
                               atol=1e-6, rtol=1e-5)


def test_eager_baseline_num_items_in_batch():
    cfg = usd.UniSDConfig.preset("unisd_star", normalize="token")
    inputs = make_inputs(Case("unisd_star", 2, 8, 64))
    a, b = detached_copy(inputs, torch.float64), detached_copy(inputs, torch.float64)
    mine = eager_unisd_loss(**a, config=cfg, num_items_in_batch=11).loss
    ref = usd.unisd_loss(**b, config=cfg, num_items_in_batch=11, impl="reference").loss
    assert float(mine.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)


def test_inputs_are_deterministic_and_self_distillation_like():
    case = Case("unisd_star", 2, 16, 300)
    a, b = make_inputs(case), make_inputs(case)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ignored = (a["labels"] == -100).float().mean()
    assert 0.0 < ignored < 0.3
    assert a["view_logits"].shape == (3, 2, 16, 300)
    assert a["student_hidden"].shape == (2, 16, 256) and a["student_hidden"].requires_grad
    gap = (a["student_logits"] - a["teacher_logits"]).std()
    assert gap < 0.25 * a["teacher_logits"].std()


def test_byte_budget_is_design_section_5():
    inputs = make_inputs(Case("unisd_star", 1, 4, 100, hidden=8))
    s = 4 * 100 * 4
    h = 4 * 8 * 4
    assert byte_budget(inputs, "fwd_bwd") == 2 * (s + s) + s + 4 * s + 5 * h
    assert byte_budget(inputs, "fwd") + byte_budget(inputs, "bwd") == byte_budget(
        inputs, "fwd_bwd")


def _rows(out: Path):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_in_process_writes_csv_table_and_plots(tmp_path, capsys):
    bench_main(["--device", "cpu", "--in-process", "--presets", "unisd_star",
                "--providers", "eager,unisd", "--vocab", "128,256", "--tokens", "16,32",
                "--modes", "bwd,fwd_bwd", "--reps", "1", "--warmup", "0", "--out",
                str(tmp_path)])
    rows = _rows(tmp_path)
    assert {r["provider"] for r in rows} == {"eager", "unisd"}
    assert {r["mode"] for r in rows} == {"bwd", "fwd_bwd"}
    metrics = {r["metric"] for r in rows}
    assert {"time_ms", "mem_mb", "gbps", "loss_rel_err", "grad_rel_err"} <= metrics
    assert all(r["status"] == "ok" for r in rows)
    errs = [float(r["value"]) for r in rows if r["metric"] == "grad_rel_err"]
    assert max(errs) < 1e-4
    table = (tmp_path / "table.md").read_text()
    assert "| unisd |" in table and "/ eager" in table
    assert (tmp_path / "plot_unisd_star_fp32_fwd_bwd.png").stat().st_size > 0
    assert (tmp_path / "machine.md").exists()
    assert "forward+backward only" in capsys.readouterr().out


def test_sweep_worker_processes_and_skips(tmp_path):
    bench_main(["--device", "cpu", "--presets", "sd", "--providers", "eager,unisd,liger",
                "--vocab", "128", "--tokens", "16", "--modes", "fwd_bwd", "--reps", "1",
                "--warmup", "0", "--interpret-max", "0", "--out", str(tmp_path)])
    rows = _rows(tmp_path)
    by = {(r["provider"], r["metric"]): r for r in rows}
    assert float(by[("eager", "mem_mb")]["value"]) >= 0
    assert float(by[("unisd", "grad_rel_err")]["value"]) < 1e-4
    assert by[("liger", "status")]["status"] == "skipped"


@pytest.mark.slow
def test_compiled_baseline_matches_eager():
    cfg = usd.UniSDConfig.preset("unisd_star")
    inputs = make_inputs(Case("unisd_star", 2, 8, 128))
    a, b = detached_copy(inputs), detached_copy(inputs)
    eager = eager_unisd_loss(**a, config=cfg).loss
    compiled = compiled_loss(cfg, True)(**b)
    eager.backward()
    compiled.backward()
    assert float(compiled.detach()) == pytest.approx(float(eager.detach()), rel=1e-5)
    torch.testing.assert_close(a["student_logits"].grad, b["student_logits"].grad)


def test_sweep_first_call_in_a_process_per_case(tmp_path, capsys):
    bench_main(["--device", "cpu", "--presets", "sd", "--providers", "eager,unisd",
                "--vocab", "128,256", "--tokens", "16", "--modes", "fwd_bwd", "--reps", "1",
                "--warmup", "1", "--first-call", "--out", str(tmp_path)])
    rows = _rows(tmp_path)
    firsts = {(r["provider"], r["vocab"]): float(r["value"]) for r in rows
              if r["metric"] == "first_mem_mb"}
    assert set(firsts) == {(p, v) for p in ("eager", "unisd") for v in ("128", "256")}
    assert all(value >= 0 for value in firsts.values())
    assert all(float(r["value"]) > 0 for r in rows if r["metric"] == "first_time_ms")
    errs = [float(r["value"]) for r in rows if r["metric"] == "grad_rel_err"]
    assert len(errs) == 4 and max(errs) < 1e-4  # each process finds its case's reference
    out = capsys.readouterr().out
    assert "first / steady peak" in out and "| sd | 4 x 4 | 256 |" in out
