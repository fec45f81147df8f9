"""The length-N step between the two passes: clip threshold, agreement weights, normalisers,
hinge, and ``combine``, which folds them into the loss and two per-row gradient
coefficients (docs/kernels.md, "The length-N step").

Everything here works on (B, T) or (K, B, T) float32 tensors on the logits' device and never
syncs with the host (no ``.item()``, no boolean indexing), so a CUDA step stays asynchronous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..backends.protocol import RowStats
from ..config import AGREEMENT_SCALE_FLOOR, SEQUENCE_WEIGHT_FLOOR, UniSDConfig


def disagreement(view_lp, stat: str, unbiased: bool):
    """Spread of the K view label log-probs along dim 0: variance or max - min."""
    if stat == "range":
        return view_lp.amax(0) - view_lp.amin(0)
    return view_lp.var(dim=0, correction=1 if unbiased else 0)


def masked_quantile(values, mask, q: float):
    """torch.quantile (linear interpolation) of values[mask] as a 0-dim tensor; 0 if empty."""
    flat = values.reshape(-1)
    keep = mask.reshape(-1)
    n = keep.sum()
    ordered = torch.where(keep, flat, float("inf")).sort().values
    last = torch.clamp(n - 1, min=0)
    pos = q * last.to(flat.dtype)
    lo = torch.clamp(pos.floor().long(), max=last)
    hi = torch.clamp(pos.ceil().long(), max=last)
    low, high = ordered.gather(0, lo.view(1)).view(()), ordered.gather(0, hi.view(1)).view(())
    value = low + (pos - lo.to(flat.dtype)) * (high - low)
    return torch.where(n > 0, value, torch.zeros_like(value))


def clip_threshold(d, mask, cfg):
    """The clip constant: a Python float (static clip: no host-to-device copy), the masked
    ``clip_quantile`` of the divergences ``d`` as a 0-dim tensor, or None (no clipping)."""
    if cfg.clip is not None:
        return float(cfg.clip)
    if cfg.clip_quantile is not None:
        return masked_quantile(d, mask, cfg.clip_quantile)
    return None


def agreement_weights(view_lp, mask, cfg, view_mask=None):
    """Agreement weights (B, T) from view label log-probs (K, B, T); 0 on ignored tokens.
    ``view_mask`` (B, T): the positions the views scored (None: all); the others weigh 1
    and take no part in the scale s (token) or in the sequence means (sequence), and a
    sequence with no scored position weighs 1."""
    scored = mask if view_mask is None else mask & view_mask
    if cfg.agreement == "token":
        d = disagreement(view_lp, cfg.agreement_stat, unbiased=True)
        s = torch.clamp(masked_quantile(d, scored, cfg.agreement_quantile),
                        min=AGREEMENT_SCALE_FLOOR)
        ratio = torch.clamp(d / s, max=cfg.agreement_cap)
        w = torch.clamp(1.0 / (1.0 + cfg.agreement_gamma * ratio), min=cfg.agreement_floor)
        w = torch.where(scored, w, 1.0)
    else:
        m = scored.to(view_lp.dtype)
        mu = (view_lp * m).sum(-1) / torch.clamp(m.sum(-1), min=1.0)
        d = disagreement(mu, cfg.agreement_stat, unbiased=False)
        w = torch.clamp(torch.exp(-cfg.agreement_gamma * d), min=SEQUENCE_WEIGHT_FLOOR)
        w = torch.where(scored.any(-1), w, 1.0).unsqueeze(-1).expand_as(mask)
    return torch.where(mask, w, 0.0)


class RowScales(NamedTuple):
    """Per-token factors known before any divergence: the agreement weight ``w``, the kd
    term's ``kd`` (w over its normaliser) and the other terms' ``token`` (mask over its)."""

    weight: torch.Tensor
    kd: torch.Tensor
    token: torch.Tensor


def importance_ratio(student_label, old_lp, cfg):
    """The clipped importance-sampling ratio of ``cfg.importance_clip`` per token (a
    constant): min(exp(clamp(log p_S(y) - old, -20, 20)), clip)."""
    ratio = torch.exp((student_label.float() - old_lp.float()).clamp(-20.0, 20.0))
    return ratio.clamp(max=cfg.importance_clip)


def with_ratio(scales: RowScales, student_label, old_lp, cfg) -> RowScales:
    """``scales`` with every term's factor times the importance ratio (unchanged without
    ``cfg.importance_clip``); ``old_lp`` of the same rows."""
    if cfg.importance_clip is None:
        return scales
    ratio = importance_ratio(student_label, old_lp, cfg)
    return RowScales(scales.weight, scales.kd * ratio, scales.token * ratio)


def row_scales(mask, cfg, view_lp, num_items_in_batch, view_mask=None) -> RowScales:
    """Agreement weights and normalisers (B, T): they depend on the labels and views only."""
    m = mask.float()
    token = token_scale(m, cfg.normalize, num_items_in_batch)
    if cfg.agreement == "none":
        return RowScales(m, token, token)
    scored = mask if view_mask is None else mask & view_mask
    w = agreement_weights(torch.where(scored, view_lp.float(), 0.0), mask, cfg, view_mask)
    return RowScales(w, token_scale(w, cfg.normalize, num_items_in_batch), token)


class RowCoefficients(NamedTuple):
    """Per-row results of ``row_coefficients``: the gradient coefficients ``ck``, ``cc``, the
    clipped mask and the hinge value (None without contrastive term)."""

    ck: torch.Tensor
    cc: torch.Tensor
    clipped: torch.Tensor
    hinge: torch.Tensor | None


def row_coefficients(d, s_lab, t_lab, b_lab, mask, c, scales: RowScales, cfg):
    """``ck = kd_weight * kd_scale * (not clipped)`` and ``cc = lambda_c * scale * g`` of any
    subset of rows, given the clip constant ``c`` (None: off) and the negative's label
    log-probs ``b_lab`` (0 on ignored rows; unused without contrastive term)."""
    if c is None:
        clipped = torch.zeros_like(mask)
        ck = cfg.kd_weight * scales.kd
    else:
        clipped = mask & (d > c)
        ck = cfg.kd_weight * scales.kd * (~clipped)
    if cfg.contrastive_weight > 0:
        value, sign = hinge(s_lab, t_lab, b_lab, cfg.contrastive_margin)
        return RowCoefficients(ck, cfg.contrastive_weight * scales.token * sign, clipped, value)
    return RowCoefficients(ck, torch.zeros_like(ck), clipped, None)


def token_scale(weights, normalize: str, num_items_in_batch):
    """Per-token factor turning sum_i scale_i * x_i into the masked mean of docs/losses.md,
    "Reductions"."""
    if num_items_in_batch is not None:
        return weights / num_items_in_batch
    if normalize == "sequence":
        per_seq = torch.clamp(weights.sum(-1, keepdim=True), min=1.0) * weights.shape[0]
        return weights / per_seq
    return weights / torch.clamp(weights.sum(), min=1.0)


def hinge(s, a, b, margin: float):
    """(c, g): the contrastive hinge and d c / d s = 1[c>0] (sign(s-a) - sign(s-b))."""
    c = torch.clamp(margin + (s - a).abs() - (s - b).abs(), min=0.0)
    g = (c > 0).to(s.dtype) * (torch.sign(s - a) - torch.sign(s - b))
    return c, g


@dataclass
class Coefficients:
    """The length-N step's results: the loss, its detached terms and diagnostics, and what
    the gradient pass needs (``ck``, ``cc`` per row; the scaled hidden-state difference)."""

    loss: torch.Tensor
    kd: torch.Tensor
    contrastive: torch.Tensor
    feature: torch.Tensor
    divergence: torch.Tensor
    weight: torch.Tensor
    clipped: torch.Tensor
    ck: torch.Tensor
    cc: torch.Tensor
    hidden_grad: torch.Tensor | None


def combine(stats: RowStats, mask: torch.Tensor, cfg: UniSDConfig, view_lp, negative_lp,
            student_hidden, teacher_hidden, num_items_in_batch,
            view_mask=None, old_lp=None) -> Coefficients:
    """From the row stats and the views' and negative's label log-probs (scored where
    ``view_mask``, None: everywhere) to the loss and the per-row gradient coefficients.
    Length-N work only; no host sync. ``old_lp``: the rollout's label log-probs of
    ``cfg.importance_clip``."""
    d = stats.divergence
    scales = row_scales(mask, cfg, view_lp, num_items_in_batch, view_mask)
    if cfg.importance_clip is not None:
        old_lp = torch.where(mask, old_lp.float(), stats.student_label)
        scales = with_ratio(scales, stats.student_label, old_lp, cfg)
    c = clip_threshold(d, mask, cfg)
    b_lab = torch.where(mask, negative_lp.float(), 0.0) if cfg.contrastive_weight > 0 else None
    rows = row_coefficients(d, stats.student_label, stats.teacher_label, b_lab, mask, c,
                               scales, cfg)
    d_used = torch.where(rows.clipped, c, d) if c is not None else d
    kd = (scales.kd * d_used).sum()
    loss = cfg.kd_weight * kd

    contrastive = loss.new_zeros(())
    if cfg.contrastive_weight > 0:
        contrastive = (scales.token * rows.hinge).sum()
        loss = loss + cfg.contrastive_weight * contrastive

    feature = loss.new_zeros(())
    diff = None
    if cfg.feature_weight > 0:
        diff = torch.where(mask.unsqueeze(-1),
                           student_hidden.float() - teacher_hidden.float(), 0.0)
        feature = (scales.token * diff.pow(2).mean(-1)).sum()
        loss = loss + cfg.feature_weight * feature
        diff.mul_((cfg.feature_weight * 2.0 / diff.shape[-1]) * scales.token.unsqueeze(-1))
    return Coefficients(loss, kd, contrastive, feature, d, scales.weight, rows.clipped, rows.ck,
                        rows.cc, diff)
