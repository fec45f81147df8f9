"""The float64 reference against closed forms, hand-computed cases, gradcheck and the
gradient formulas of docs/losses.md."""

import math

import pytest
import torch

from unisd_fast import UniSDConfig
from unisd_fast import reference as ref

F64 = torch.float64


def run(cfg, z, u, y, **kw):
    return ref.unisd_loss_reference(z, u, y, config=cfg, **kw)


def bernoulli_kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_divergences_closed_form_two_classes():
    # softmax([0, x]) = [1 - sigmoid(x), sigmoid(x)]
    z = torch.tensor([[0.0, 0.3]], dtype=F64)
    u = torch.tensor([[0.0, -1.2]], dtype=F64)
    p_s, p_t = torch.sigmoid(torch.tensor(0.3)).item(), torch.sigmoid(torch.tensor(-1.2)).item()
    assert ref.divergence(z, u, "fkl", 1.0).item() == pytest.approx(bernoulli_kl(p_t, p_s))
    assert ref.divergence(z, u, "rkl", 1.0).item() == pytest.approx(bernoulli_kl(p_s, p_t))
    a = 0.3
    m = (1 - a) * p_s + a * p_t
    jsd = a * bernoulli_kl(p_t, m) + (1 - a) * bernoulli_kl(p_s, m)
    assert ref.divergence(z, u, "jsd", 1.0, a).item() == pytest.approx(jsd)
    # temperature divides the logits
    assert ref.divergence(z, u, "fkl", 0.5).item() == pytest.approx(
        ref.divergence(2 * z, 2 * u, "fkl", 1.0).item())


def test_divergence_zero_for_equal_distributions():
    z = torch.randn(3, 11, dtype=F64)
    for kind in ("fkl", "rkl", "jsd"):
        assert ref.divergence(z, z + 5.0, kind, 0.7).abs().max().item() < 1e-12


def test_jsd_limits():
    z, u = torch.randn(4, 9, dtype=F64), torch.randn(4, 9, dtype=F64)
    fkl, rkl = ref.divergence(z, u, "fkl", 1.0), ref.divergence(z, u, "rkl", 1.0)
    a = 1e-6
    assert torch.allclose(ref.divergence(z, u, "jsd", 1.0, a) / a, fkl, rtol=1e-4)
    assert torch.allclose(ref.divergence(z, u, "jsd", 1.0, 1 - a) / a, rkl, rtol=1e-4)


def test_hand_computed_loss_sequence_and_token_normalisation():
    # Two sequences; sequence 0 has tokens with D = d00, d01; sequence 1 has one live token.
    z = torch.randn(2, 2, 5, dtype=F64)
    u = torch.randn(2, 2, 5, dtype=F64)
    y = torch.tensor([[1, 2], [3, -100]])
    d = ref.divergence(z, u, "fkl", 0.7)
    seq = run(UniSDConfig(), z, u, y)
    expected_seq = ((d[0, 0] + d[0, 1]) / 2 + d[1, 0]) / 2
    assert seq["loss"].item() == pytest.approx(expected_seq.item())
    tok = run(UniSDConfig(normalize="token"), z, u, y)
    assert tok["loss"].item() == pytest.approx(((d[0, 0] + d[0, 1] + d[1, 0]) / 3).item())
    items = run(UniSDConfig(normalize="token"), z, u, y, num_items_in_batch=10)
    assert items["loss"].item() == pytest.approx(((d[0, 0] + d[0, 1] + d[1, 0]) / 10).item())
    assert seq["token_divergence"][1, 1].item() == 0.0


def test_clip_static_and_quantile():
    z = torch.randn(2, 6, 7, dtype=F64) * 3
    u = torch.randn(2, 6, 7, dtype=F64) * 3
    y = torch.randint(0, 7, (2, 6))
    y[1, 4:] = -100
    mask = y != -100
    d = ref.divergence(z, u, "fkl", 0.7)
    c = d[mask].median().item()
    out = run(UniSDConfig(clip=c, normalize="token"), z, u, y)
    expected = torch.where(mask, torch.clamp(d, max=c), 0.0).sum() / mask.sum()
    assert out["loss"].item() == pytest.approx(expected.item())
    assert torch.equal(out["clipped"], mask & (d > c))
    q = run(UniSDConfig(clip_quantile=0.3, normalize="token"), z, u, y)
    cq = torch.quantile(d[mask], 0.3)
    assert torch.equal(q["clipped"], mask & (d > cq))


def test_clipped_tokens_get_no_gradient():
    z = (torch.randn(1, 8, 6, dtype=F64) * 3).requires_grad_()
    u = torch.randn(1, 8, 6, dtype=F64) * 3
    y = torch.randint(0, 6, (1, 8))
    out = run(UniSDConfig(clip_quantile=0.5), z, u, y)
    out["loss"].backward()
    clipped = out["clipped"][0]
    assert clipped.any() and (~clipped).any()
    assert z.grad[0, clipped].abs().max().item() == 0.0
    assert z.grad[0, ~clipped].abs().max().item() > 0.0


def test_token_agreement_hand_computed():
    mask = torch.tensor([[True, True, True, False]])
    view_lp = torch.tensor([[[-1.0, -2.0, -0.5, 9.0]], [[-1.0, -1.0, -2.5, 9.0]]], dtype=F64)
    cfg = UniSDConfig(agreement="token", agreement_gamma=2.0, agreement_quantile=1.0,
                      agreement_cap=10.0, agreement_floor=0.01)
    w = ref.agreement_weights(view_lp, mask, cfg)
    d = torch.tensor([0.0, 0.5, 2.0], dtype=F64)  # unbiased variance of two values
    s = 2.0  # the 1.0-quantile of d
    expected = 1.0 / (1.0 + 2.0 * d / s)
    assert torch.allclose(w[0, :3], expected)
    assert w[0, 3].item() == 0.0
    rng = ref.agreement_weights(view_lp, mask, cfg.replace(agreement_stat="range"))
    d_range = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    assert torch.allclose(rng[0, :3], 1.0 / (1.0 + 2.0 * d_range / 2.0))


def test_token_agreement_cap_and_floor():
    mask = torch.ones(1, 3, dtype=torch.bool)
    view_lp = torch.tensor([[[0.0, 0.0, 0.0]], [[0.0, 0.1, 50.0]]], dtype=F64)
    cfg = UniSDConfig(agreement="token", agreement_gamma=1000.0, agreement_quantile=0.5,
                      agreement_cap=3.0, agreement_floor=0.05)
    w = ref.agreement_weights(view_lp, mask, cfg)
    assert w[0, 0].item() == 1.0
    assert w[0, 2].item() == pytest.approx(0.05)  # 1 / (1 + 1000 * 3) is below the floor


def test_sequence_agreement_hand_computed():
    mask = torch.tensor([[True, True], [True, False]])
    view_lp = torch.tensor([[[-1.0, -3.0], [-2.0, 7.0]], [[-2.0, -2.0], [-2.0, -7.0]]],
                           dtype=F64)
    cfg = UniSDConfig(agreement="sequence", agreement_gamma=0.5)
    w = ref.agreement_weights(view_lp, mask, cfg)
    # sequence 0: view means -2 and -2 -> variance 0; sequence 1: -2 and -2 -> 0
    assert torch.allclose(w, mask.to(F64))
    view_lp[1, 0, 0] = 0.0  # sequence 0 means -2 and -1: population variance 0.25
    w = ref.agreement_weights(view_lp, mask, cfg)
    assert w[0, 0].item() == pytest.approx(math.exp(-0.5 * 0.25))


def test_contrastive_hinge_value_and_gradient_formula():
    z = torch.randn(1, 6, 9, dtype=F64, requires_grad=True)
    u, n = torch.randn(1, 6, 9, dtype=F64), torch.randn(1, 6, 9, dtype=F64)
    y = torch.randint(0, 9, (1, 6))
    tau, delta = 0.7, 0.5
    cfg = UniSDConfig(kd_weight=0.0, contrastive_weight=1.0, contrastive_margin=delta,
                      normalize="token")
    out = run(cfg, z, u, y, negative_logits=n)
    out["loss"].backward()
    mask = torch.ones_like(y, dtype=torch.bool)
    s = ref.label_logprob(z.detach(), y, mask, tau)
    a = ref.label_logprob(u, y, mask, tau)
    b = ref.label_logprob(n, y, mask, tau)
    c = torch.clamp(delta + (s - a).abs() - (s - b).abs(), min=0)
    assert out["contrastive"].item() == pytest.approx(c.mean().item())
    g = (c > 0).to(F64) * (torch.sign(s - a) - torch.sign(s - b))
    p = torch.softmax(z.detach() / tau, -1)
    onehot = torch.nn.functional.one_hot(y, 9).to(F64)
    expected = g.unsqueeze(-1) * (onehot - p) / tau / y.numel()
    assert torch.allclose(z.grad, expected)


def test_feature_matching_value_and_gradient():
    hs = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    ht = torch.randn(2, 3, 4, dtype=F64)
    z = torch.randn(2, 3, 5, dtype=F64)
    y = torch.tensor([[0, 1, -100], [2, 3, 4]])
    cfg = UniSDConfig(kd_weight=0.0, feature_weight=1.0)
    out = run(cfg, z, z, y, student_hidden=hs, teacher_hidden=ht)
    out["loss"].backward()
    f = ((hs.detach() - ht) ** 2).sum(-1) / 4
    expected = ((f[0, 0] + f[0, 1]) / 2 + f[1].mean()) / 2
    assert out["feature"].item() == pytest.approx(expected.item())
    g = 2 * (hs.detach() - ht) / 4
    assert torch.allclose(hs.grad[0, :2], g[0, :2] / 2 / 2)
    assert torch.allclose(hs.grad[1], g[1] / 3 / 2)
    assert hs.grad[0, 2].abs().max().item() == 0.0


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_divergence_gradient_formulas(kind):
    tau, a = 0.7, 0.3
    z = torch.randn(5, 13, dtype=F64, requires_grad=True)
    u = torch.randn(5, 13, dtype=F64)
    d = ref.divergence(z, u, kind, tau, a)
    d.sum().backward()
    p_s, p_t = torch.softmax(z.detach() / tau, -1), torch.softmax(u / tau, -1)
    if kind == "fkl":
        expected = (p_s - p_t) / tau
    elif kind == "rkl":
        expected = p_s * (p_s.log() - p_t.log() - d.detach().unsqueeze(-1)) / tau
    else:
        log_m = ((1 - a) * p_s + a * p_t).log()
        s_i = (p_s * (p_s.log() - log_m)).sum(-1, keepdim=True)
        expected = (1 - a) * p_s * (p_s.log() - log_m - s_i) / tau
    assert torch.allclose(z.grad, expected, atol=1e-12)


OPTIONS = [
    {},
    {"divergence": "rkl"},
    {"divergence": "jsd", "jsd_alpha": 0.3},
    {"clip": 0.05},
    {"agreement": "token", "agreement_gamma": 0.5},
    {"agreement": "token", "agreement_stat": "range"},
    {"agreement": "sequence", "agreement_gamma": 0.5},
    {"contrastive_weight": 0.5, "contrastive_margin": 0.3},
    {"feature_weight": 0.5},
    {"kd_weight": 0.0, "feature_weight": 1.0},
    {"normalize": "token"},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                  o.items()) or "default")
def test_gradcheck(options):
    cfg = UniSDConfig(**options)
    B, T, V, H = 2, 3, 5, 4
    z = torch.randn(B, T, V, dtype=F64, requires_grad=True)
    hs = torch.randn(B, T, H, dtype=F64, requires_grad=True)
    u = torch.randn(B, T, V, dtype=F64)
    y = torch.tensor([[0, 4, -100], [2, 1, 3]])
    kw = {
        "view_logits": torch.randn(3, B, T, V, dtype=F64),
        "negative_logits": torch.randn(B, T, V, dtype=F64),
        "teacher_hidden": torch.randn(B, T, H, dtype=F64),
    }
    torch.autograd.gradcheck(
        lambda zz, hh: run(cfg, zz, u, y, student_hidden=hh, **kw)["loss"], (z, hs))


def test_quantile_clip_gradient_treats_the_threshold_as_a_constant():
    # The quantile moves with z, but by definition it is a constant of the gradient, so the
    # gradient is that of a static clip at the same value (gradcheck would see dc/dz).
    z = torch.randn(2, 4, 7, dtype=F64) * 2
    u = torch.randn(2, 4, 7, dtype=F64) * 2
    y = torch.randint(0, 7, (2, 4))
    grads = []
    c = torch.quantile(ref.divergence(z, u, "fkl", 0.7).flatten(), 0.4).item()
    for cfg in (UniSDConfig(clip_quantile=0.4), UniSDConfig(clip=c)):
        zz = z.clone().requires_grad_()
        run(cfg, zz, u, y)["loss"].backward()
        grads.append(zz.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


def test_all_ignored_rows_give_exact_zero_and_no_nan():
    z = torch.randn(2, 3, 6, dtype=F64, requires_grad=True)
    u = torch.randn(2, 3, 6, dtype=F64)
    y = torch.full((2, 3), -100)
    cfg = UniSDConfig.preset("unisd_star", clip_quantile=0.5)
    hs = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    out = run(cfg, z, u, y, view_logits=torch.randn(3, 2, 3, 6, dtype=F64),
              negative_logits=torch.randn(2, 3, 6, dtype=F64), student_hidden=hs,
              teacher_hidden=torch.randn(2, 3, 4, dtype=F64))
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert z.grad.abs().max().item() == 0.0 and hs.grad.abs().max().item() == 0.0


def test_non_finite_values_in_ignored_rows_do_not_leak():
    z = torch.randn(1, 3, 6, dtype=F64)
    z[0, 1] = float("nan")
    z[0, 2, 0] = float("inf")
    z.requires_grad_()
    u = torch.randn(1, 3, 6, dtype=F64)
    y = torch.tensor([[2, -100, -100]])
    out = run(UniSDConfig(), z, u, y)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(z.grad).all()
    assert z.grad[0, 1:].abs().max().item() == 0.0


def test_float64_in_float64_out_and_low_precision_upcast():
    z = torch.randn(1, 2, 5, dtype=F64)
    y = torch.tensor([[0, 1]])
    assert run(UniSDConfig(), z, z, y)["loss"].dtype == F64
    zb = z.to(torch.bfloat16).requires_grad_()
    out = run(UniSDConfig(), zb, zb.detach(), y)
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert zb.grad.dtype == torch.bfloat16
