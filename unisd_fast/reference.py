"""The UniSD loss in plain PyTorch: the executable form of docs/losses.md.

Every fused implementation is tested against this file. It favours clarity over memory: it
materialises full log-softmax tensors. Arithmetic runs in float32, or float64 when the inputs
are float64, so a float64 call gives a float64 answer; float32 computes the divergence in
the cancellation-free form of docs/losses.md (``backends/stable.py``). It imports only the
package's constants (``config.py``) and those formulas; the config argument only needs the
attributes of ``UniSDConfig``.
"""

from __future__ import annotations

import math

import torch

from .backends.stable import MIX_NEAR_MAX_LOG_RATIO, mix_kl_terms, shifted_kl
from .config import AGREEMENT_SCALE_FLOOR, SEQUENCE_WEIGHT_FLOOR, TAIL_LOG_MASS_CAP


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def _xlogy_terms(p, diff):
    """p * diff, 0 where p == 0 (a column of probability 0 contributes 0)."""
    return p * torch.where(p == 0, 0.0, diff)


def textbook_divergence(z, u, kind: str, tau: float, alpha: float = 0.5):
    """D from the log-probabilities as docs/losses.md writes it."""
    return category_divergence(torch.log_softmax(z / tau, dim=-1),
                               torch.log_softmax(u / tau, dim=-1), kind, alpha)


def category_divergence(log_ps, log_pt, kind: str, alpha: float = 0.5):
    """D between two distributions given by their log-probabilities over the categories of
    the last dimension, by the textbook formulas."""
    if kind == "fkl":
        return _xlogy_terms(log_pt.exp(), log_pt - log_ps).sum(-1)
    if kind == "rkl":
        return _xlogy_terms(log_ps.exp(), log_ps - log_pt).sum(-1)
    both = (log_ps == -math.inf) & (log_pt == -math.inf)  # log M = -inf, no gradient
    log_m = torch.logaddexp(torch.where(both, 0.0, log_ps + math.log(1 - alpha)),
                            torch.where(both, 0.0, log_pt + math.log(alpha)))
    kl_tm = _xlogy_terms(log_pt.exp(), log_pt - log_m).sum(-1)
    kl_sm = _xlogy_terms(log_ps.exp(), log_ps - log_m).sum(-1)
    return alpha * kl_tm + (1 - alpha) * kl_sm


def divergence(z, u, kind: str, tau: float, alpha: float = 0.5):
    """Per-row D between p_S = softmax(z/tau) and p_T = softmax(u/tau), last dim reduced.

    float64 inputs take the textbook formulas; float32 inputs the cancellation-free form of
    docs/losses.md ("Accuracy when the student is close to the teacher"), except rows with
    a -inf on one side only. A column of probability 0 contributes 0, so columns where z and
    u are both -inf drop out.
    """
    if kind not in ("fkl", "rkl", "jsd"):
        raise ValueError(f"unknown divergence {kind!r}")
    textbook = textbook_divergence(z, u, kind, tau, alpha)
    if z.dtype == torch.float64:
        return textbook
    one_sided = ((z == -math.inf) != (u == -math.inf)).any(-1)
    return torch.where(one_sided, textbook, stable_divergence(z, u, kind, tau, alpha))


def stable_divergence(z, u, kind: str, tau: float, alpha: float = 0.5):
    """D in the shifted form: with dx = (z - u) / tau centred on its p_T-mean (a constant
    shift), D_fkl = log E_pT[e^x] - E_pT[x], and D_rkl likewise with p_S and -dx centred on
    its p_S-mean; jsd from the log-ratio r = lp_T - lp_S = L + mu - dx of the fkl shift, each
    KL to the mixture in the terms of ``mix_kl_terms`` (docs/losses.md). Differentiable in z.
    Columns with a -inf take dx = 0 (right where both sides are -inf)."""
    log_ps = torch.log_softmax(z / tau, dim=-1)
    log_pt = torch.log_softmax(u / tau, dim=-1)
    p_s, p_t = log_ps.exp(), log_pt.exp()
    both = (z == -math.inf) & (u == -math.inf)
    dx = torch.where((z == -math.inf) | (u == -math.inf), 0.0, z - u) / tau
    mu = (p_t * dx).sum(-1, keepdim=True).detach()
    x = dx - mu
    d_f, lg, _ = shifted_kl(p_t, x, log_pt + x)
    if kind == "fkl":
        return d_f
    if kind == "rkl":
        mu_s = (p_s * dx).sum(-1, keepdim=True).detach()
        d_r, _, _ = shifted_kl(p_s, mu_s - dx, log_ps + mu_s - dx)
        return d_r
    log_a = torch.tensor(math.log(alpha), dtype=z.dtype)
    log_1ma = torch.tensor(math.log1p(-alpha), dtype=z.dtype)
    r = (lg + mu.squeeze(-1)).unsqueeze(-1) - dx
    near = torch.where(both, 0.0, r).detach().abs().amax(-1, keepdim=True) < \
        MIX_NEAR_MAX_LOG_RATIO
    kl_tm = _xlogy_terms(p_t, mix_kl_terms(-r, 1 - alpha, log_1ma, log_a, near)).sum(-1)
    kl_sm = _xlogy_terms(p_s, mix_kl_terms(r, alpha, log_a, log_1ma, near)).sum(-1)
    return alpha * kl_tm + (1 - alpha) * kl_sm


def student_topk(z, k: int):
    """Indices of the k largest logits of each row; equal values go to the lower index."""
    return torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :k]


def support_logprobs(lp, tail: bool):
    """The categories of a sparse support from the log-probs ``lp`` (..., k) of its tokens:
    with ``tail`` the k tokens and one bucket log(1 - P), P = sum exp(lp) (log P clamped at
    TAIL_LOG_MASS_CAP), else the k tokens renormalised, lp - log P."""
    log_mass = torch.logsumexp(lp, dim=-1, keepdim=True)
    if not tail:
        return lp - log_mass
    log_mass = torch.clamp(log_mass, max=TAIL_LOG_MASS_CAP)
    return torch.cat([lp, torch.log(-torch.expm1(log_mass))], dim=-1)


def sparse_divergence(z, u, index, teacher_lp, cfg):
    """Per-row D over a sparse support: the student's top ``cfg.topk`` (``index`` None; the
    teacher's log-probs at them from ``u``) or the given ``index`` with the teacher's
    log-probs ``teacher_lp``; the student's log-probs from its full log-sum-exp."""
    tau = cfg.temperature
    if index is None:
        index = student_topk(z, cfg.topk)
        teacher_lp = torch.log_softmax(u / tau, dim=-1).gather(-1, index)
    student_lp = torch.log_softmax(z / tau, dim=-1).gather(-1, index)
    return category_divergence(support_logprobs(student_lp, cfg.tail_bucket),
                               support_logprobs(teacher_lp, cfg.tail_bucket),
                               cfg.divergence, cfg.jsd_alpha)


def given_label_logprob(labels, mask, index, teacher_lp, teacher_label_lp):
    """The teacher's label log-probs of a given support: ``teacher_label_lp`` where given,
    else the support's entry at the label (inputs checked to hold it); 0 on ignored rows."""
    if teacher_label_lp is None:
        at = index == labels.unsqueeze(-1)
        teacher_label_lp = torch.where(at, teacher_lp, 0.0).sum(-1)
    return torch.where(mask, teacher_label_lp, torch.zeros_like(teacher_label_lp))


def label_logprob(x, labels, mask, tau: float):
    """log softmax(x/tau)[labels] per row; 0 where mask is False."""
    safe = torch.where(mask, labels, 0)
    lp = torch.log_softmax(x / tau, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, lp, torch.zeros_like(lp))


def importance_ratio(student_lp, old_lp, clip: float):
    """SDFT's clipped importance-sampling ratio min(exp(clamp(lp - old, -20, 20)), clip)."""
    return torch.exp(torch.clamp(student_lp - old_lp, -20.0, 20.0)).clamp(max=clip)


def masked_quantile(values, mask, q: float):
    """torch.quantile (linear interpolation) of values[mask]; None when mask is empty."""
    selected = values[mask]
    if selected.numel() == 0:
        return None
    return torch.quantile(selected, q)


def clip_threshold(d, mask, clip, clip_quantile):
    """The clip constant c (a detached scalar tensor) or None when clipping is off."""
    if clip is not None:
        return torch.tensor(float(clip), dtype=d.dtype)
    if clip_quantile is not None:
        c = masked_quantile(d.detach(), mask, clip_quantile)
        return None if c is None else c.detach()
    return None


def disagreement(view_lp, stat: str, unbiased: bool):
    """Spread of K view log-probs along dim 0: variance (K-1 or K denominator) or range."""
    if stat == "range":
        return view_lp.amax(0) - view_lp.amin(0)
    return view_lp.var(dim=0, correction=1 if unbiased else 0)


def agreement_weights(view_lp, mask, cfg, view_mask=None):
    """Agreement weights (B, T) from view label log-probs (K, B, T); constants. Where
    ``view_mask`` is False (positions the views did not score) the weight is 1, and those
    positions take no part in the scale s or the sequence means."""
    view_lp = view_lp.detach()
    scored = mask if view_mask is None else mask & view_mask
    one = torch.ones((), dtype=view_lp.dtype)
    if cfg.agreement == "token":
        d = disagreement(view_lp, cfg.agreement_stat, unbiased=True)
        s = masked_quantile(d, scored, cfg.agreement_quantile)
        s = torch.clamp(s if s is not None else d.new_zeros(()), min=AGREEMENT_SCALE_FLOOR)
        ratio = torch.clamp(d / s, max=cfg.agreement_cap)
        w = torch.clamp(1.0 / (1.0 + cfg.agreement_gamma * ratio), min=cfg.agreement_floor)
        w = torch.where(scored, w, one)
    elif cfg.agreement == "sequence":
        m = scored.to(view_lp.dtype)
        mu = (view_lp * m).sum(-1) / torch.clamp(m.sum(-1), min=1.0)
        d = disagreement(mu, cfg.agreement_stat, unbiased=False)
        w = torch.clamp(torch.exp(-cfg.agreement_gamma * d), min=SEQUENCE_WEIGHT_FLOOR)
        w = torch.where(scored.any(-1), w, one)
        w = w.unsqueeze(-1).expand_as(mask).clone()
    else:
        raise ValueError(f"unknown agreement {cfg.agreement!r}")
    return torch.where(mask, w, torch.zeros_like(w))


def contrastive_hinge(s, a, b, margin: float):
    """c = max(0, margin + |s - a| - |s - b|), a and b constants."""
    return torch.clamp(margin + (s - a.detach()).abs() - (s - b.detach()).abs(), min=0.0)


def feature_distance(h_s, h_t):
    """f = ||h_S - h_T||^2 / H per token."""
    return (h_s - h_t.detach()).pow(2).mean(-1)


def masked_mean(values, weights, normalize: str, num_items_in_batch):
    """The reductions of docs/losses.md, "Reductions": per-sequence or per-token weighted
    masked means."""
    if num_items_in_batch is not None:
        return (weights * values).sum() / num_items_in_batch
    if normalize == "sequence":
        per_seq = (weights * values).sum(-1) / torch.clamp(weights.sum(-1), min=1.0)
        return per_seq.mean()
    return (weights * values).sum() / torch.clamp(weights.sum(), min=1.0)


def unisd_loss_reference(
    student_logits,
    teacher_logits,
    labels,
    *,
    config,
    view_logits=None,
    view_logprobs=None,
    negative_logits=None,
    negative_logprobs=None,
    student_hidden=None,
    teacher_hidden=None,
    num_items_in_batch=None,
    teacher_indices=None,
    teacher_logprobs=None,
    teacher_label_logprobs=None,
    view_mask=None,
    old_logprobs=None,
):
    """The whole UniSD loss; returns a dict of loss, its parts and per-token diagnostics.
    ``view_mask`` (B, T) bool: where the views were scored (None: everywhere).

    Inputs are assumed validated (see ``unisd_fast.losses``). Rows whose label is
    ``config.ignore_index`` are replaced by zeros before any arithmetic, so non-finite values
    there never reach the loss or the gradient. A sparse support: ``config.topk``, or the
    given ``teacher_indices`` and ``teacher_logprobs`` (B, T, k) with ``teacher_logits``
    None (``sparse_divergence``). ``old_logprobs`` with ``config.importance_clip``: every
    token's loss times the clipped importance ratio ``importance_ratio``.
    """
    cfg = config
    dtype = compute_dtype(student_logits, teacher_logits, student_hidden, teacher_logprobs)
    mask = labels != cfg.ignore_index
    row_mask = mask.unsqueeze(-1)
    zero = torch.zeros((), dtype=dtype)

    z = torch.where(row_mask, student_logits.to(dtype), zero)
    u = None if teacher_logits is None else \
        torch.where(row_mask, teacher_logits.to(dtype), zero).detach()
    tau = cfg.temperature

    if teacher_indices is not None:
        k = teacher_indices.shape[-1]
        index = torch.where(row_mask, teacher_indices.long(),
                            torch.arange(k, device=z.device))
        teacher_lp = torch.where(row_mask, teacher_logprobs.to(dtype), zero)
        d = sparse_divergence(z, None, index, teacher_lp, cfg)
    elif cfg.topk is not None:
        d = sparse_divergence(z, u, None, None, cfg)
    else:
        d = divergence(z, u, cfg.divergence, tau, cfg.jsd_alpha)
    d = torch.where(mask, d, torch.zeros_like(d))
    c = clip_threshold(d, mask, cfg.clip, cfg.clip_quantile)
    clipped = mask & (d > c) if c is not None else torch.zeros_like(mask)
    d_clipped = torch.where(clipped, c.to(dtype) if c is not None else zero, d)

    if cfg.agreement != "none":
        scored = mask if view_mask is None else mask & view_mask
        if view_logprobs is not None:
            view_lp = torch.where(scored, view_logprobs.to(dtype), zero)
        else:
            views = torch.stack([v.to(dtype) for v in view_logits])
            views = torch.where(scored.unsqueeze(-1).unsqueeze(0), views, zero)
            view_lp = label_logprob(views, labels.expand(views.shape[:-1]), scored,
                                    cfg.view_temperature)
        w = agreement_weights(view_lp, mask, cfg, view_mask)
    else:
        w = mask.to(dtype)
    m = mask.to(dtype)
    r = torch.ones_like(m)
    if cfg.importance_clip is not None:
        s_lab = label_logprob(z, labels, mask, tau).detach()
        r = importance_ratio(s_lab, torch.where(mask, old_logprobs.to(dtype), s_lab),
                             cfg.importance_clip)

    kd = masked_mean(d_clipped * r, w * m, cfg.normalize, num_items_in_batch)
    loss = cfg.kd_weight * kd

    contrastive = zero
    if cfg.contrastive_weight > 0:
        s = label_logprob(z, labels, mask, tau)
        if u is None:
            given = None if teacher_label_logprobs is None else teacher_label_logprobs.to(dtype)
            a = given_label_logprob(labels, mask, index, teacher_lp, given)
        else:
            a = label_logprob(u, labels, mask, tau)
        if negative_logprobs is not None:
            b = torch.where(mask, negative_logprobs.to(dtype), zero)
        else:
            n = torch.where(row_mask, negative_logits.to(dtype), zero)
            b = label_logprob(n, labels, mask, tau)
        hinge = torch.where(mask, contrastive_hinge(s, a, b, cfg.contrastive_margin), zero)
        contrastive = masked_mean(hinge * r, m, cfg.normalize, num_items_in_batch)
        loss = loss + cfg.contrastive_weight * contrastive

    feature = zero
    if cfg.feature_weight > 0:
        h_s = torch.where(row_mask, student_hidden.to(dtype), zero)
        h_t = torch.where(row_mask, teacher_hidden.to(dtype), zero)
        f = feature_distance(h_s, h_t)
        feature = masked_mean(f * r, m, cfg.normalize, num_items_in_batch)
        loss = loss + cfg.feature_weight * feature

    return {
        "loss": loss,
        "kd": kd.detach(),
        "contrastive": contrastive.detach(),
        "feature": feature.detach(),
        "token_divergence": d.detach(),
        "token_weight": w.detach(),
        "clipped": clipped,
    }
