"""The CPU path's small inputs: the mean-shifted one-call pass of fkl and rkl, its fallback to
the general pass, the whole-loss call, and the label pass at small sizes."""

import pytest
import torch
from loss_inputs import make_inputs, run_loss

import unisd_fast as usd
from unisd_fast.backends.pytorch import TorchBackend, TorchSettings
from unisd_fast.backends.pytorch import backend as tb
from unisd_fast.config import UniSDConfig

TAU = 0.7


def rows(R, V, eps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(R, V, generator=gen) * 2
    z = u + eps * torch.randn(R, V, generator=gen)
    y = torch.randint(0, V, (R,), generator=gen)
    y[1] = -100
    return z, u, y


def small_call(z, u, y, divergence, backend=None):
    backend = backend or TorchBackend(compile=False)
    return backend.row_stats_and_grad(z.unsqueeze(0), u.unsqueeze(0), y.unsqueeze(0),
                                      divergence=divergence, tau=TAU, alpha=0.5,
                                      ignore_index=-100)


def float64_rows(z, u, divergence):
    """Per-row D and d D / d z of fkl or rkl in float64, the textbook forms."""
    lps = torch.log_softmax(z.double() / TAU, -1)
    lpt = torch.log_softmax(u.double() / TAU, -1)
    ps, pt = lps.exp(), lpt.exp()
    if divergence == "fkl":
        return (pt * (lpt - lps)).sum(-1), (ps - pt) / TAU
    d = (ps * (lps - lpt)).sum(-1)
    return d, ps * (lps - lpt - d.unsqueeze(-1)) / TAU


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
@pytest.mark.parametrize("V", [1000, 4099])
@pytest.mark.parametrize("eps", [0.05, 0.01, 0.002])
def test_shifted_pass_meets_the_exactness_targets(divergence, V, eps):
    z, u, y = rows(6, V, eps)
    stats, grad, finite = small_call(z, u, y, divergence)
    assert finite
    keep = y != -100
    d_ref, g_ref = float64_rows(z, u, divergence)
    rel = (stats.divergence[0].double() - d_ref).abs()[keep] / d_ref[keep]
    assert rel.median() <= 1e-4 and rel.max() <= 1e-3, rel
    g = grad[0].double()
    assert (g[keep] - g_ref[keep]).norm() / g_ref[keep].norm() <= 1e-5
    assert (g[~keep] == 0).all() and (stats.divergence[0][~keep] == 0).all()


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_shifted_pass_keeps_peaked_rows(divergence):
    """Logits of spread 30 at tau = 0.7 (logits / tau of size 100): the pass forms
    (logit - row max) / tau before exponentiating, so p keeps its digits (2.3e-7 measured;
    with logits / tau rounded first, 2.3e-6 for fkl and 3.2e-6 for rkl)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(6, 1000, generator=gen) * 30
    z = u + 0.3 * torch.randn(6, 1000, generator=gen)
    y = torch.randint(0, 1000, (6,), generator=gen)
    stats, grad, finite = small_call(z, u, y, divergence)
    assert finite
    _, g_ref = float64_rows(z, u, divergence)
    assert (grad[0].double() - g_ref).norm() / g_ref.norm() <= 1e-6
    lp_ref = torch.log_softmax(z.double() / TAU, -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(stats.student_label[0].double(), lp_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_shifted_pass_is_exactly_zero_at_the_teacher(divergence):
    _, u, y = rows(4, 1000, 0.0)
    stats, grad, finite = small_call(u.clone(), u, y, divergence)
    assert finite
    assert (stats.divergence == 0).all() and (grad == 0).all()
    assert torch.equal(stats.student_label, stats.teacher_label)
    assert (stats.lse_gap == 0).all()


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_shifted_pass_agrees_with_the_general_pass(divergence):
    z, u, y = rows(6, 1000, 0.5)
    stats, grad, finite = small_call(z, u, y, divergence)
    assert finite
    keep = y != -100
    general, g_general = tb.STATS_GRADS[divergence](z, u, y, keep, torch.tensor(TAU),
                                                    torch.tensor(0.5))
    for k, (a, b) in enumerate(zip(torch.stack(stats)[:, 0], general, strict=True)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, msg=f"stat {k}")
    # elementwise up to the cancellation where G crosses zero, in both fp32 forms
    torch.testing.assert_close(grad[0], g_general, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
@pytest.mark.parametrize("bad", ["-inf column", "-inf on one side", "+inf", "nan"])
def test_a_kept_row_with_a_non_finite_logit_takes_the_general_pass(divergence, bad):
    z, u, y = rows(6, 1000, 0.05)
    if bad == "-inf column":
        z[:, 7] = u[:, 7] = float("-inf")
    elif bad == "-inf on one side":
        z[2, 7] = float("-inf")
    else:
        u[3, 5] = float(bad)
    y[y == 7] = 8
    stats, grad, finite = small_call(z, u, y, divergence)
    assert not finite
    general, g_general = tb.STATS_GRADS[divergence](z, u, y, y != -100, torch.tensor(TAU),
                                                    torch.tensor(0.5))
    same = {"rtol": 0, "atol": 0, "equal_nan": True}
    torch.testing.assert_close(torch.stack(stats)[:, 0], general, **same)
    torch.testing.assert_close(grad[0], g_general, **same)


def test_an_ignored_row_with_a_non_finite_logit_keeps_the_shifted_pass():
    z, u, y = rows(6, 1000, 0.05)
    z[1, 3] = float("inf")  # row 1 is ignored
    stats, grad, finite = small_call(z, u, y, "fkl")
    assert finite
    assert (grad[0, 1] == 0).all() and (torch.stack(stats)[:, 0, 1] == 0).all()


def test_jsd_and_large_inputs_take_the_general_pass():
    z, u, y = rows(6, 1000, 0.05)
    assert small_call(z, u, y, "jsd")[2] is False
    backend = TorchBackend(compile=False, small_elements=z.numel() - 1)
    assert small_call(z, u, y, "fkl", backend) is None


@pytest.mark.parametrize("x_kind", ["finite", "+inf row", "-inf label", "bf16"])
def test_label_pass_matches_float64_log_softmax(x_kind):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 1000, generator=gen) * 3
    y = torch.randint(0, 1000, (2, 5), generator=gen)
    y[0, 1] = -100
    if x_kind == "+inf row":
        x[1, 2, 9] = float("inf")
    elif x_kind == "-inf label":
        x[1, 3, y[1, 3]] = float("-inf")
    elif x_kind == "bf16":
        x = x.bfloat16()
    backend = TorchBackend(compile=False)
    got = backend.label_logprob(x, y, tau=TAU, ignore_index=-100)
    keep = y != -100
    exact = torch.log_softmax(x.double() / TAU, -1).gather(-1, y.clamp(min=0).unsqueeze(-1))
    exact = torch.where(keep, exact.squeeze(-1), 0.0)
    if x_kind == "+inf row":  # log_softmax gives NaN on the whole row, as the pass does
        assert got[1, 2].isnan()
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=2e-6, equal_nan=True)
    assert (got[~keep] == 0).all()


@pytest.mark.parametrize("preset", ["sd", "unisd_star"])
def test_clipped_and_ignored_rows_get_an_exactly_zero_gradient(preset):
    torch.manual_seed(0)
    inputs = make_inputs(2, 6, 300)
    cfg = UniSDConfig.preset(preset, clip=0.05)
    out, (dz, _) = run_loss(inputs, cfg, "torch")
    assert out.clipped.any()
    zero = out.clipped | (inputs["labels"] == -100)
    if cfg.contrastive_weight == 0:
        assert (dz[zero] == 0).all()
    assert (dz[inputs["labels"] == -100] == 0).all()
    ref, (dz_ref, _) = run_loss(inputs, cfg, "reference", upcast=True)
    torch.testing.assert_close(dz.double(), dz_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-7)
    assert TorchSettings().small_elements >= inputs["student_logits"].numel()


@pytest.mark.parametrize("small", [True, False])
def test_inactive_rows_stay_zero_when_a_logit_is_infinite(small):
    """kd_weight = 0 makes every row inactive (ck = cc = 0): a kept row holding +inf (whose
    divergence gradient is NaN) must still get a zero logits gradient, on both paths."""
    impl = "torch" if small else TorchBackend(small_elements=0)
    torch.manual_seed(0)
    inputs = make_inputs(2, 4, 300)
    inputs["student_logits"][0, 0, 5] = float("inf")  # a kept row
    cfg = UniSDConfig.preset("match_repr")
    out, (dz, dh) = run_loss(inputs, cfg, impl)
    assert out.kd.isnan()  # the NaN is reported in the loss, not in the inactive rows
    assert (dz == 0).all() and torch.isfinite(dh).all()


def path_of(out):
    """Which autograd Function produced the loss: the whole-loss call or the fused passes."""
    return type(out.loss.grad_fn).__name__.removesuffix("Backward")


@pytest.mark.parametrize("preset", ["sd", "gkd", "clip", "agreement", "unisd_star"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_inputs_run_the_whole_loss_in_one_call(preset, dtype):
    """The whole-loss path (small.py) against the two streaming passes of the fused Function:
    same loss, diagnostics and gradients."""
    torch.manual_seed(0)
    inputs = make_inputs(2, 5, 300, dtype=dtype)
    cfg = UniSDConfig.preset(preset)
    out, (dz, dh) = run_loss(inputs, cfg, "torch")
    assert path_of(out) == "GradientFunction" and dz.dtype == dtype
    ref, (dz_ref, dh_ref) = run_loss(inputs, cfg, TorchBackend(small_elements=0))
    assert path_of(ref) == "UniSDFunction"
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-4}
    for name in ("loss", "kd", "contrastive", "feature", "token_divergence", "token_weight"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), **tol, msg=name)
    assert torch.equal(out.clipped, ref.clipped)
    torch.testing.assert_close(dz.float(), dz_ref.float(), **tol)
    torch.testing.assert_close(dh, dh_ref, **tol)


def test_a_flagged_row_sends_the_call_to_the_fused_function():
    torch.manual_seed(0)
    inputs = make_inputs(2, 4, 300)
    inputs["student_logits"][0, 0, 5] = float("inf")
    out, _ = run_loss(inputs, UniSDConfig.preset("sd"), "torch")
    assert path_of(out) == "UniSDFunction"


def test_whole_loss_writes_the_gradient_in_place_and_scales_it():
    torch.manual_seed(0)
    inputs = make_inputs(2, 4, 300)
    cfg = UniSDConfig.preset("unisd_star")
    args = {k: v for k, v in inputs.items() if k not in ("student_logits", "student_hidden")}
    grads = []
    for inplace in (False, True):
        z = inputs["student_logits"].clone().requires_grad_()
        h = inputs["student_hidden"].clone().requires_grad_()
        out = usd.unisd_loss(z * 1, student_hidden=h, config=cfg, impl="torch",
                             inplace_backward=inplace, **args)
        assert path_of(out) == "GradientFunction"
        (3.0 * out.loss).backward()
        grads.append((z.grad, h.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)
