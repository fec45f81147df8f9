"""The ahead-of-time compiled block functions of the CPU path (backends/pytorch/aot.py):
which calls they serve, and (slow: two AOTInductor builds, minutes from an empty cache) that
a fresh process runs the streaming passes from their packages, equal to the eager passes,
with neither dynamo nor inductor imported."""

import textwrap

import pytest
import torch
from compiled_process import run_compiled

from unisd_fast.backends.pytorch import TorchBackend, passes
from unisd_fast.backends.pytorch.aot import AotFunctions, cache_dir, signature
from unisd_fast.backends.pytorch.compiler import Compiler


def test_signature_takes_contiguous_tensors_only():
    x = torch.zeros(4, 6)
    assert signature((x, torch.zeros(4, dtype=torch.long), torch.tensor(0.5))) == [
        ("float32", ["rows", 6]), ("int64", ["rows"]), ("float32", [])]
    assert signature((x[:, ::2],)) is None
    assert signature((x, 0.5)) is None
    assert signature((torch.zeros(2, 3, 4),)) is None


def test_runner_declines_what_a_package_cannot_serve(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISD_FAST_AOT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    aot = AotFunctions("unisd_fast.backends.pytorch.backend:BLOCK_FUNCTIONS")
    one_row = (torch.zeros(1, 8), torch.zeros(1, 8))
    strided = (torch.zeros(4, 16)[:, ::2], torch.zeros(4, 8))
    assert aot.runner(len, one_row) is None and aot.runner(len, strided) is None
    assert not any(tmp_path.iterdir())  # declined before any build


def test_a_failed_build_warns_once_and_declines(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISD_FAST_AOT_CACHE", str(tmp_path))
    aot = AotFunctions("no_such_module:BLOCKS")
    args = (torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=bool),
            torch.tensor(1.0))
    with pytest.warns(RuntimeWarning, match="ahead-of-time build of label_block failed"):
        assert aot.runner(passes.label_block, args) is None
    assert aot.runner(passes.label_block, args) is None  # not retried, no second warning
    assert not list(tmp_path.glob("*.pt2"))


def test_only_the_inductor_compiler_goes_ahead_of_time():
    registry = "unisd_fast.backends.pytorch.backend:BLOCK_FUNCTIONS"
    assert Compiler(True, "inductor", ahead_of_time=registry).aot is not None
    assert Compiler(True, "aot_eager", ahead_of_time=registry).aot is None
    assert Compiler(True, "inductor").aot is None
    assert TorchBackend(ahead_of_time=False).compiler.aot is None


SCRIPT = textwrap.dedent("""
    import sys, warnings
    import torch
    import unisd_fast as usd
    from unisd_fast.backends.pytorch import TorchBackend, passes
    from loss_inputs import make_inputs, run_loss

    warnings.filterwarnings("error", message="unisd_fast")
    aot = TorchBackend(compile_min_elements=0, small_elements=0)
    eager = TorchBackend(compile=False, small_elements=0)
    assert aot.compiler.aot is not None
    cfg = usd.UniSDConfig(contrastive_weight=0.1, contrastive_margin=0.2)
    for T in (3, 5):  # two row counts, one package per function
        inputs = make_inputs(B=2, T=T, V=1000)
        got, (gz, _) = run_loss(inputs, cfg, aot)
        want, (wz, _) = run_loss(inputs, cfg, eager)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(gz, wz, rtol=1e-5, atol=1e-9)
    loaded = [m for m in sys.modules if m.startswith(("torch._dynamo", "torch._inductor"))]
    assert not loaded, loaded
    print("ahead of time ok", len(aot.compiler.aot._runners))
""")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA runs Triton")
def test_streaming_passes_run_from_packages_without_a_compiler(tmp_path):
    out = run_compiled(SCRIPT, UNISD_FAST_AOT="1", UNISD_FAST_AOT_CACHE=str(tmp_path))
    assert "ahead of time ok" in out, out
    assert len(list(tmp_path.glob("*.pt2"))) >= 3  # stats, labels of the negative, grad
