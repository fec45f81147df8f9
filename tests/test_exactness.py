"""Accuracy when the student is close to the teacher (docs/losses.md): per-token D and the
logits gradient against float64 of the same inputs, for student = teacher + eps * noise; on
unrelated student and teacher, at least the digits of the textbook formula in float32; and
the masked vocabulary (columns where student and teacher are both -inf).

The full V = 32000 table runs for impl="torch" (its streaming passes at that size) and the
float32 reference; Triton's interpreter and impl="torch"'s small-input path run the same
targets at V = 4099, and the small-input path's float32 sums at V = 1000
(benchmarks/exactness.py prints the V = 32000 table for every impl).
"torch-stream" is impl="torch" with the small-input path off (tests/loss_inputs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loss_inputs import resolve_impl, with_settings  # noqa: E402

import unisd_fast as usd  # noqa: E402
from benchmarks.exactness import (  # noqa: E402
    _float64,
    all_errors,
    close_inputs,
    divergence_and_grad,
    errors,
    rounding_floor,
    unrelated_inputs,
)
from unisd_fast.backends.pytorch import passes  # noqa: E402

DIVERGENCES = ["fkl", "rkl", "jsd"]
D_MEDIAN, D_MAX, GRAD = 1e-4, 1e-3, 1e-5
# "at least as exact as the textbook formula in float32", within 25% and 4 float32 ulps
TEXTBOOK_SLACK, ULPS = 1.25, 4 * torch.finfo(torch.float32).eps


def check_targets(B, T, V, impl, divergence, grad=GRAD):
    cfg = usd.UniSDConfig(divergence=divergence, temperature=0.7)
    for eps in (0.05, 0.01, 0.002):
        rel_d, rel_g, _, _ = errors(*close_inputs(B, T, V, eps), cfg, impl)
        assert rel_d.median().item() <= D_MEDIAN, (eps, rel_d.median().item())
        assert rel_d.max().item() <= D_MAX, (eps, rel_d.max().item())
        assert rel_g <= grad, (eps, rel_g)
    d, g = divergence_and_grad(*close_inputs(B, T, V, 0.0), cfg, impl)
    assert d.abs().max().item() == 0.0 and g.abs().max().item() == 0.0


@pytest.mark.parametrize("impl", [
    "torch", pytest.param("reference", marks=pytest.mark.slow)])  # reference: 20-70 s each
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_close_to_teacher_full_vocab(impl, divergence, device):
    if device == "cuda" and impl == "torch":
        pytest.skip("the CPU backend")
    check_targets(2, 33, 32000, impl, divergence)


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_close_to_teacher_small_vocab(impl, divergence):
    check_targets(2, 3, 4099, impl, divergence)


@pytest.mark.parametrize("impl", ["torch", "torch-stream", "reference"])
@pytest.mark.parametrize("divergence,alpha", [("fkl", 0.5), ("rkl", 0.5)] + [
    ("jsd", a) for a in (0.001, 0.1, 0.5, 0.9, 0.999)])
def test_unrelated_at_least_as_exact_as_textbook_float32(impl, divergence, alpha):
    """Independent student and teacher logits, row scales 1 to 8 and 8x apart either way:
    the per-token D (max), the batch loss and the gradient (in norm) are at least as close
    to float64 as the textbook formula in float32 with its autograd gradient. Before the
    per-row jsd forms and the anchored log-probs the CPU path was 1.0-1.7x the textbook at
    alpha 0.1-0.9 and 10x it (1.3e-5) at alpha 0.999; measured now 0.1-0.5x (benchmarks/
    exactness.py --regime unrelated). The float32 reference is held to it in D and the
    loss; its gradient, autograd's through those forms, reaches 1.6x the textbook's."""
    inputs = unrelated_inputs(2, 8, 1000)
    cfg = usd.UniSDConfig(divergence=divergence, jsd_alpha=alpha)
    exact = _float64(*inputs, cfg)
    textbook = all_errors(*inputs, cfg, "textbook-fp32", exact)
    got = all_errors(*inputs, cfg, impl, exact)
    if impl == "reference":
        del got["grad"]
    for key, value in got.items():
        assert value <= TEXTBOOK_SLACK * textbook[key] + ULPS, (key, got, textbook)


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_close_to_teacher_float32_sums(divergence):
    """The compiled small-input pass sums in float32 up to FLOAT32_SUM_COLUMNS columns; its
    row values in float64 keep the gradient well inside the target (2.7e-7 measured; with
    e^-L - 1 in float32 it was 7.9e-6 at eps = 0.002)."""
    assert 1000 <= passes.FLOAT32_SUM_COLUMNS < 4099
    check_targets(2, 8, 1000, "torch", divergence, grad=1e-6)


@pytest.mark.parametrize("impl", ["torch", "torch-stream"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_peaked_rows_with_improbable_labels(impl, divergence):
    """Nearly one-hot teachers (logits 30 N(0, 1) at tau = 0.7) whose labels are improbable:
    the CPU passes shift at the peak of p (or its mean), not at the label. Measured 2.2e-5
    (streaming; with the label shift 8.4e-3 for fkl) and 2.2e-7 (small inputs, fkl, rkl)."""
    impl = resolve_impl(impl)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 1000, generator=gen) * 30
    z = u + 0.3 * torch.randn(2, 3, 1000, generator=gen)
    y = torch.randint(0, 1000, (2, 3), generator=gen)
    cfg = usd.UniSDConfig(divergence=divergence, temperature=0.7)
    _, rel_g, _, _ = errors(z, u, y, cfg, impl)
    assert rel_g <= 1e-4, rel_g


@pytest.mark.parametrize("impl", ["torch", "torch-stream", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradient_at_the_rounding_floor(impl, dtype):
    impl = resolve_impl(impl)
    cfg = usd.UniSDConfig(divergence="jsd" if dtype == torch.float16 else "fkl")
    for eps in (0.01, 0.002):
        inputs = close_inputs(2, 3, 4099, eps, dtype)
        floor = rounding_floor(*inputs, cfg)
        _, rel_g, _, _ = errors(*inputs, cfg, impl)
        assert rel_g <= 1.02 * floor + 1e-6, (eps, rel_g, floor)


def masked_inputs(V, masked, dtype=torch.float32):
    z, u, labels = close_inputs(2, 4, V, 0.3, dtype)
    labels[0, 1] = masked[3]  # a label inside the masked columns: D is still defined
    z[..., masked] = float("-inf")
    u[..., masked] = float("-inf")
    return z, u, labels


@pytest.mark.parametrize("impl", ["torch", "torch-stream", "triton", "reference",
                                  "reference-fp64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_drops_the_masked_columns(impl, divergence):
    # The first 300 columns (a whole 256-wide tile) and a scattered set are -inf on both
    # sides: D and the gradient over the rest equal float64 on the remaining columns alone,
    # and the masked columns get a zero gradient.
    V = 1000
    masked = torch.cat([torch.arange(300), torch.arange(301, V, 97)])
    keep = torch.ones(V, dtype=torch.bool)
    keep[masked] = False
    z, u, labels = masked_inputs(V, masked)
    cfg = usd.UniSDConfig(divergence=divergence)
    exp_d, exp_g = divergence_and_grad(z[..., keep].double(), u[..., keep].double(),
                                       torch.zeros_like(labels), cfg, "reference")
    if impl == "reference-fp64":
        z, u, impl = z.double(), u.double(), "reference"
    impl = resolve_impl(impl)
    if impl == "triton":
        impl = with_settings(impl, triton={"max_block": 256})
    d, g = divergence_and_grad(z, u, labels, cfg, impl)
    assert torch.isfinite(d).all() and torch.isfinite(g).all()
    assert g[..., ~keep].abs().max().item() == 0.0
    torch.testing.assert_close(d, exp_d, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(g[..., keep], exp_g, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_far_apart_student_and_teacher_keep_the_loss(divergence, impl):
    # Unrelated logits of spread 3 to 8: the shift at the label column leaves E[e^x] far
    # below 1 on many rows, where the shifted form lost up to 3% of D; the textbook form
    # must take over there (D is large, no cancellation). Measured: <= 1e-6 relative for
    # fkl/rkl, 4e-5 on one Triton jsd row.
    g = torch.Generator().manual_seed(0)
    cfg = usd.UniSDConfig(divergence=divergence)
    for spread in (3.0, 5.0, 8.0):
        z = torch.randn(2, 8, 1000, generator=g) * spread
        u = torch.randn(2, 8, 1000, generator=g) * spread
        y = torch.randint(0, 1000, (2, 8), generator=g)
        exact = usd.unisd_loss(z.double(), u.double(), y, config=cfg, impl="reference")
        got = usd.unisd_loss(z, u, y, config=cfg, impl=impl)
        torch.testing.assert_close(got.token_divergence.double(), exact.token_divergence,
                                   rtol=1e-4, atol=1e-6)
