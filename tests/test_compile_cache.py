"""The compiled CPU path across processes that share torch.compile's on-disk cache.

The gradient pass writes over the student logits (inplace_backward, the fused-linear
chunks) or over the teacher's (fused-linear with a soft-cap). Handing a compiled graph one
tensor as both a read input and the mutated output made torch.compile build a "synthetic
base" of the chunk buffer, and a graph cached by a process with another chunk size then
failed its size assertion: the backend fell back to eager for good (2x slower, 3x memory in
the fused-linear benchmark). Two processes with different chunk sizes; our fall-back
warning is an error."""

import textwrap

import pytest
import torch
from compiled_process import run_compiled

SCRIPT = textwrap.dedent("""
    import sys, warnings
    import torch
    import unisd_fast as usd
    from unisd_fast.backends.pytorch import TorchBackend
    from linear_inputs import make_case

    warnings.filterwarnings("error", message="unisd_fast")
    backend = TorchBackend(compile_min_elements=0)
    assert backend.is_compiled
    rows = int(sys.argv[1])
    torch.manual_seed(0)
    case = make_case(B=2, T=8, H=16, V=1000, bias=False)
    cfg = usd.UniSDConfig()
    hs = case["student_hidden"].clone().requires_grad_()
    for softcap in (None, 30.0):
        out = usd.unisd_linear_loss(hs, case["student_weight"], case["teacher_hidden"],
                                    case["teacher_weight"], case["labels"], config=cfg,
                                    logit_softcap=softcap, chunk_bytes=rows * 2 * 1000 * 4,
                                    impl=backend)
        out.loss.backward()
    z = torch.randn(2, 8, 1000)
    u = z + 0.1 * torch.randn(2, 8, 1000)
    stacked = torch.cat([z, u])[: 2 * rows // 8 or 1]
    x = stacked.clone().requires_grad_()
    y = torch.randint(0, 1000, tuple(x.shape[:2]))
    teacher = x.detach() + 0.1
    usd.unisd_loss(x * 1, teacher, y, config=cfg, inplace_backward=True,
                   impl=backend).loss.backward()
    assert torch.isfinite(hs.grad).all() and torch.isfinite(x.grad).all()
    print("compiled ok", rows)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA runs Triton")
def test_two_processes_with_other_chunk_sizes_stay_compiled(tmp_path):
    for rows in (8, 4):
        stdout = run_compiled(SCRIPT, str(rows), TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
        assert f"compiled ok {rows}" in stdout
