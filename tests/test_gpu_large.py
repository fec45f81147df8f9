"""Compiled Triton path on a real GPU at tokens x vocab above 2^31 elements (int64 offsets
end to end). Rows at both ends are checked against the float64 reference on those rows."""

import pytest
import torch

import unisd_fast as usd

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_beyond_int32_offsets():
    B, T, V = 1, 14200, 151936
    assert B * T * V > 2**31
    torch.manual_seed(0)
    teacher = (torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16) * 2)
    student = (teacher.float() + 0.1 * torch.randn_like(teacher, dtype=torch.float32)).to(
        torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (B, T), device="cuda")
    cfg = usd.UniSDConfig(normalize="token")
    out = usd.unisd_loss(student, teacher, labels, config=cfg, impl="triton")
    out.loss.backward()
    for rows in (slice(0, 4), slice(T - 4, T)):
        z = student.detach()[:, rows].double().requires_grad_()
        ref = usd.reference.unisd_loss_reference(z, teacher[:, rows].double(), labels[:, rows],
                                                 config=cfg)
        torch.testing.assert_close(out.token_divergence[:, rows].double(),
                                   ref["token_divergence"], atol=1e-4, rtol=1e-3)
        (ref["loss"] * 4 / T).backward()  # the same rows' share of the token mean
        torch.testing.assert_close(student.grad[:, rows].double() * T, z.grad * T, atol=1e-6,
                                   rtol=2e-2)
