"""The GPU check's own benchmark modules at tiny shapes on CPU (Triton's interpreter):
benchmarks.gpu_exactness passes its thresholds and exits 1 when a case misses one;
benchmarks.gpu_kernels reports every kernel and the whole loss."""

from benchmarks import gpu_exactness, gpu_kernels

TINY = ["--device", "cpu", "--tokens", "4", "--vocab", "600", "--dtype", "bf16"]


def test_exactness_passes_and_fails_on_a_miss(tmp_path, monkeypatch):
    args = [*TINY, "--rows", "2", "--divergences", "fkl", "--out", str(tmp_path)]
    assert gpu_exactness.main(args) == 0
    table = (tmp_path / "exactness.md").read_text()
    assert table.count("| yes |") == len(gpu_exactness.FAMILIES)
    monkeypatch.setattr(gpu_exactness, "D_MAX", 0.0)
    assert gpu_exactness.main(args) == 1
    assert "**NO**" in (tmp_path / "exactness.md").read_text()


def test_kernels_report_each_step(tmp_path):
    args = [*TINY, "--reps", "1", "--presets", "unisd_star", "--copy-bytes", "100000",
            "--out", str(tmp_path)]
    assert gpu_kernels.main(args) == 0
    table = (tmp_path / "kernels.md").read_text()
    for step in ("stats", "grad", "label (one view)", "loss fwd+bwd"):
        assert f"| unisd_star | {step} |" in table
