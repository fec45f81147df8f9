"""Adaptive agreement (docs/losses.md, "Adaptive agreement"): the loss with a view mask
against the float64 reference, the reference's masked weights against their definition, the
row selection, and the bound on the difference to full agreement."""

import pytest
import torch
from linear_inputs import make_case, run_linear, run_materialised
from loss_inputs import make_inputs, resolve_impl, run_loss
from test_impls import assert_close_to_reference, config_and_kwargs, option_id

import unisd_fast as usd
from unisd_fast import reference as ref

F64 = torch.float64
OPTIONS = [
    {"agreement": "token", "agreement_gamma": 0.5},
    {"agreement": "token", "agreement_gamma": 3.0, "agreement_stat": "range",
     "agreement_quantile": 0.5},
    {"agreement": "sequence", "agreement_gamma": 2.0},
    {"agreement": "token", "agreement_gamma": 1.0, "normalize": "token"},
    {"agreement": "token", "agreement_gamma": 1.0, "normalize": "token", "num_items_in_batch": 9},
    {"agreement": "token", "agreement_gamma": 1.0, "clip_quantile": 0.7},
    "unisd_star",
]


def some_mask(B, T, seed=0):
    """A (B, T) view mask with a fully scored row, a fully unscored row and a partial one,
    as a non-contiguous tensor."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) < 0.5
    m[0] = True
    m[-1] = False
    return m.t().contiguous().t()


@pytest.mark.parametrize("impl", ["torch", "torch-stream", "triton"])
@pytest.mark.parametrize("vocab", [257, 1000])
@pytest.mark.parametrize("option", OPTIONS, ids=option_id)
def test_loss_with_view_mask_matches_reference(impl, vocab, option):
    cfg, kw = config_and_kwargs(option)
    inputs = make_inputs(B=4, T=5, V=vocab)
    mask = some_mask(4, 5)
    assert not mask.is_contiguous()
    assert_close_to_reference(inputs, cfg, resolve_impl(impl), view_mask=mask, **kw)


@pytest.mark.parametrize("option", OPTIONS, ids=option_id)
def test_linear_loss_with_view_mask_matches_reference(option):
    cfg, kw = config_and_kwargs(option)
    for shared in (True, False):
        case = make_case(B=3, T=5, V=1001, shared=shared)
        mask = some_mask(3, 5, seed=1)
        exp, exp_grads = run_materialised(case, cfg, view_mask=mask.clone(), **kw)
        got, grads = run_linear(case, cfg, view_mask=mask, **kw)
        for name in ("loss", "kd", "token_weight", "token_divergence"):
            torch.testing.assert_close(getattr(got, name).double(), getattr(exp, name),
                                       atol=2e-6, rtol=2e-5)
        for g, e in zip(grads, exp_grads, strict=True):
            torch.testing.assert_close(g.double(), e, atol=2e-6, rtol=2e-5)


def test_linear_view_rows_outside_the_mask_are_never_read():
    """The view hidden states of unscored positions take no part: NaN there changes
    nothing (only the scored rows meet the head)."""
    cfg = usd.UniSDConfig(agreement="token", agreement_gamma=1.0)
    case = make_case(B=3, T=5, V=1001)
    mask = some_mask(3, 5, seed=2)
    clean, _ = run_linear(case, cfg, view_mask=mask)
    case["view_hidden"] = torch.where(mask.unsqueeze(-1), case["view_hidden"], float("nan"))
    dirty, _ = run_linear(case, cfg, view_mask=mask)
    assert torch.equal(clean.loss, dirty.loss)
    assert torch.equal(clean.token_weight, dirty.token_weight)


def test_reference_masked_weights_follow_their_definition():
    cfg = usd.UniSDConfig(agreement="token", agreement_gamma=2.0, agreement_quantile=0.6)
    view_lp = torch.randn(3, 4, 6, dtype=F64)
    mask = torch.rand(4, 6) < 0.8
    mask[2] = False
    vm = some_mask(4, 6, seed=3)
    w = ref.agreement_weights(view_lp, mask, cfg, vm)
    scored = mask & vm
    d = view_lp.var(0)
    s = torch.quantile(d[scored], 0.6)
    expected = torch.clamp(1 / (1 + 2.0 * torch.clamp(d / s, max=cfg.agreement_cap)),
                           min=cfg.agreement_floor)
    expected = torch.where(scored, expected, 1.0) * mask
    torch.testing.assert_close(w, expected, atol=0, rtol=1e-12)

    seq = cfg.replace(agreement="sequence")
    w = ref.agreement_weights(view_lp, mask, seq, vm)
    m = scored.double()
    mu = (view_lp * m).sum(-1) / m.sum(-1).clamp(min=1)
    row = torch.exp(-2.0 * mu.var(0, correction=0))
    row = torch.where(scored.any(-1), row, 1.0)
    torch.testing.assert_close(w, row.unsqueeze(-1) * mask, atol=0, rtol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "torch", "torch-stream"])
def test_no_scored_position_is_agreement_off(impl):
    """An all-False view mask gives every token weight 1: the loss without agreement."""
    inputs = make_inputs(B=3, T=5, V=257)
    cfg = usd.UniSDConfig.preset("unisd_star", agreement_gamma=1.0)
    got, grads = run_loss(inputs, cfg, resolve_impl(impl),
                          view_mask=torch.zeros(3, 5, dtype=torch.bool))
    plain = {k: v for k, v in inputs.items() if k != "view_logits"}
    exp, exp_grads = run_loss(plain, cfg.replace(agreement="none"), "reference", upcast=True)
    torch.testing.assert_close(got.loss.double(), exp.loss, atol=2e-6, rtol=2e-5)
    for g, e in zip(grads, exp_grads, strict=True):
        torch.testing.assert_close(g.double(), e, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_full_view_mask_is_full_agreement(impl):
    inputs = make_inputs(B=3, T=5, V=257)
    cfg = usd.UniSDConfig(agreement="token", agreement_gamma=1.0)
    full, full_grads = run_loss(inputs, cfg, resolve_impl(impl))
    got, grads = run_loss(inputs, cfg, resolve_impl(impl),
                          view_mask=torch.ones(3, 5, dtype=torch.bool))
    assert torch.equal(got.loss, full.loss)
    assert torch.equal(grads[0], full_grads[0])


# --- the row selection -----------------------------------------------------------------


def test_selection_is_the_fewest_rows_reaching_the_coverage():
    d = torch.tensor([[0.1, 0.1, 0.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    # token masses 0.2, 3.0, 3.0, 0.5 of 6.7: 0.9 needs 3 rows (6.0 / 6.7 = 0.896)
    assert usd.select_view_rows(d, mask, 0.89, "token").rows.tolist() == [1, 2]
    sel = usd.select_view_rows(d, mask, 0.9, "token")
    assert sel.rows.tolist() == [1, 2, 3]
    assert sel.length == 3
    assert sel.covered == pytest.approx(6.5 / 6.7)
    assert torch.equal(sel.view_mask, mask & torch.tensor([0, 1, 1, 1]).bool().unsqueeze(1))
    # sequence masses (means) 0.1, 3.0, 1.0, 0.5 of 4.6: 0.8 needs rows 1 and 2 (4.0 / 4.6)
    sel = usd.select_view_rows(d, mask, 0.8, "sequence")
    assert sel.rows.tolist() == [1, 2]
    sel = usd.select_view_rows(d, mask, 0.6, "sequence")
    assert sel.rows.tolist() == [1] and sel.length == 1
    assert usd.select_view_rows(d, mask, 0.6, "sequence", at_least=2).rows.tolist() == [1, 2]
    assert usd.select_view_rows(d, mask, 0.6, "sequence", at_least=9).rows.tolist() == \
        [0, 1, 2, 3]


def test_selection_edge_cases():
    d = torch.rand(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    full = usd.select_view_rows(d, mask, 1.0, "sequence")
    assert full.rows.tolist() == [0, 2] and full.covered == 1.0
    assert torch.equal(full.view_mask, mask)
    zero = usd.select_view_rows(torch.zeros(3, 4), mask, 0.9, "token")
    assert zero.rows.numel() == 0 and zero.length == 0 and not zero.view_mask.any()
    for bad, err in ((0.0, ValueError), (1.5, ValueError)):
        with pytest.raises(err, match="coverage"):
            usd.select_view_rows(d, mask, bad, "token")
    with pytest.raises(ValueError, match="normalize"):
        usd.select_view_rows(d, mask, 0.5, "mean")
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        usd.select_view_rows(d, mask[:2], 0.5, "token")


# --- the bound on the difference to full agreement (docs/losses.md) ------------------


def bound(cfg, d, view_lp, mask, sel, B_norm, items):
    """The bound of docs/losses.md, "Adaptive agreement", on |L_adaptive - L_full|."""
    w_min = max(1 / (1 + cfg.agreement_gamma * cfg.agreement_cap), cfg.agreement_floor)
    dis = ref.disagreement(view_lp, cfg.agreement_stat, unbiased=True)
    s_full = ref.masked_quantile(dis, mask, cfg.agreement_quantile).clamp(min=1e-6)
    s_sel = ref.masked_quantile(dis, sel.view_mask & mask, cfg.agreement_quantile)
    s_sel = s_full if s_sel is None else s_sel.clamp(min=1e-6)
    rho = float(torch.minimum(s_full, s_sel) / torch.maximum(s_full, s_sel))
    delta = min(1 - w_min, cfg.agreement_gamma * cfg.agreement_cap * (1 - rho))
    covered = torch.zeros(mask.shape[0], dtype=torch.bool)
    covered[sel.rows] = True
    dm = torch.where(mask, d, 0.0)
    if cfg.normalize == "token":
        per_row = dm.sum(-1) / items
        return float((1 - w_min) * per_row[~covered].sum() + delta * per_row[covered].sum())
    per_row = dm.sum(-1) / mask.sum(-1).clamp(min=1) / B_norm
    kappa = 1 + delta / w_min
    return float((1 / w_min - 1) * per_row[~covered].sum()
                 + (kappa ** 2 - 1) / w_min * per_row[covered].sum())


@pytest.mark.parametrize("normalize", ["sequence", "token"])
@pytest.mark.parametrize("coverage", [0.3, 0.7, 0.9])
@pytest.mark.parametrize("gamma", [1.0, 20.0])
def test_difference_to_full_agreement_is_within_the_bound(normalize, coverage, gamma):
    torch.manual_seed(int(coverage * 10) + int(gamma))
    B, T, V = 6, 8, 97
    inputs = make_inputs(B=B, T=T, V=V, dtype=F64, noise=1.0)
    inputs["student_logits"][2:4] += 3 * torch.randn(2, T, V, dtype=F64)  # two far rows
    cfg = usd.UniSDConfig(agreement="token", agreement_gamma=gamma, normalize=normalize)
    items = 17.0 if normalize == "token" else None
    labels, mask = inputs["labels"], inputs["labels"] != -100
    view_lp = torch.stack([ref.label_logprob(v, labels, mask, 1.0)
                           for v in inputs["view_logits"]])
    kw = {"view_logprobs": view_lp, "num_items_in_batch": items}
    plain = {k: v for k, v in inputs.items() if k != "view_logits"}
    full, _ = run_loss(plain, cfg, "reference", **kw)
    sel = usd.select_view_rows(full.token_divergence, mask, coverage, normalize)
    assert sel.covered >= coverage
    adaptive, _ = run_loss(plain, cfg, "reference", view_mask=sel.view_mask, **kw)
    diff = abs(float(adaptive.loss.detach() - full.loss.detach()))
    limit = bound(cfg, full.token_divergence, view_lp, mask, sel, B, items)
    assert diff <= limit + 1e-12
    if sel.rows.numel() < int(mask.any(-1).sum()):
        assert diff > 0  # the unscored rows did change the loss


# --- bad input ---------------------------------------------------------------------------


def test_bad_view_mask_and_coverage():
    inputs = make_inputs(B=2, T=3, V=11)
    cfg = usd.UniSDConfig(agreement="token")
    with pytest.raises(TypeError, match="view_mask must be a torch.bool"):
        usd.unisd_loss(**inputs, config=cfg, view_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"view_mask must have shape \(B, T\)"):
        usd.unisd_loss(**inputs, config=cfg, view_mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="view_mask is only accepted with agreement"):
        usd.unisd_loss(**{k: v for k, v in inputs.items() if k != "view_logits"},
                       view_mask=torch.ones(2, 3, dtype=torch.bool))
    for bad in (0.0, 1.2, float("nan")):
        with pytest.raises(ValueError, match="agreement_coverage"):
            usd.UniSDConfig(agreement="token", agreement_coverage=bad)
    with pytest.raises(ValueError, match="agreement_coverage < 1 .* needs agreement"):
        usd.UniSDConfig(agreement_coverage=0.5)
