"""The UniSD loss written the way the paper's code writes it, and its torch.compile.

Full fp32 ``log_softmax`` tensors of the student, the teacher, every view and the negative,
gathered and reduced with masked means: the baseline the fused implementation replaces. It
follows docs/losses.md term by term (checked against ``unisd_fast.reference`` in
``tests/test_benchmarks_smoke.py``), and it is written independently of the package, so that
the two cross-check each other. Arithmetic runs in fp32, or fp64 for fp64 inputs.

Batch statistics (quantiles) use ``nanquantile`` over NaN-masked values rather than boolean
indexing, so that torch.compile traces one graph with no data-dependent shapes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class EagerOutput(NamedTuple):
    loss: torch.Tensor
    kd: torch.Tensor
    contrastive: torch.Tensor
    feature: torch.Tensor
    token_divergence: torch.Tensor
    token_weight: torch.Tensor
    clipped: torch.Tensor


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _gather(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """q-quantile (linear) of values[mask]; NaN when mask is empty."""
    nan = torch.full_like(values, float("nan"))
    return torch.nanquantile(torch.where(mask, values, nan).flatten(), q)


def _divergence(log_ps, log_pt, cfg) -> torch.Tensor:
    if cfg.divergence == "fkl":
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if cfg.divergence == "rkl":
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    a = cfg.jsd_alpha
    log_m = torch.logsumexp(torch.stack([log_ps + math.log(1 - a), log_pt + math.log(a)]), 0)
    kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
    kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
    return a * kl_t + (1 - a) * kl_s


def _view_label_logprobs(view_logits, view_logprobs, y, cfg, dt) -> torch.Tensor:
    """(K, B, T) log softmax(v_k / tau_view)[y], one full log_softmax per view."""
    if view_logprobs is not None:
        return _upcast(view_logprobs).to(dt)
    return torch.stack([_gather(F.log_softmax(_upcast(v) / cfg.view_temperature, -1), y)
                        for v in view_logits])


def _agreement(lv, m, mask, cfg) -> torch.Tensor:
    """Agreement weights (B, T), constants."""
    lv = lv.detach()
    if cfg.agreement == "token":
        if cfg.agreement_stat == "range":
            d = lv.amax(0) - lv.amin(0)
        else:
            d = lv.var(0, correction=1)
        s = _masked_quantile(d, mask, cfg.agreement_quantile).clamp_min(1e-6)
        s = torch.nan_to_num(s, nan=1.0)
        w = 1.0 / (1.0 + cfg.agreement_gamma * torch.clamp(d / s, max=cfg.agreement_cap))
        return w.clamp_min(cfg.agreement_floor)
    mu = (lv * m).sum(-1) / m.sum(-1).clamp_min(1.0)  # (K, B)
    d_b = mu.amax(0) - mu.amin(0) if cfg.agreement_stat == "range" else mu.var(0, correction=0)
    w_b = torch.exp(-cfg.agreement_gamma * d_b).clamp_min(1e-6)
    return w_b[:, None].expand_as(m)


def _reduce(values, weights, cfg, num_items_in_batch) -> torch.Tensor:
    """Masked weighted mean of docs/losses.md ("Reduction")."""
    if num_items_in_batch is not None:
        return (weights * values).sum() / num_items_in_batch
    if cfg.normalize == "token":
        return (weights * values).sum() / weights.sum().clamp_min(1.0)
    per_seq = (weights * values).sum(-1) / weights.sum(-1).clamp_min(1.0)
    return per_seq.mean()


def eager_unisd_loss(student_logits, teacher_logits, labels, view_logits=None, view_logprobs=None,
                     negative_logits=None, negative_logprobs=None, student_hidden=None,
                     teacher_hidden=None, config=None, num_items_in_batch=None) -> EagerOutput:
    """UniSD loss (docs/losses.md) the paper's way; same arguments as ``unisd_loss``."""
    cfg = config
    if num_items_in_batch is not None and cfg.normalize != "token":
        raise ValueError("num_items_in_batch needs normalize='token'")
    tau = cfg.temperature
    mask = labels != cfg.ignore_index
    y = torch.where(mask, labels, torch.zeros_like(labels))
    z = _upcast(student_logits)
    dt = z.dtype
    m = mask.to(dt)
    zero = z.new_zeros(())

    log_ps = F.log_softmax(z / tau, -1)
    log_pt = F.log_softmax(_upcast(teacher_logits).detach() / tau, -1)
    d = _divergence(log_ps, log_pt, cfg)

    clipped = torch.zeros_like(mask)
    d_used = d
    if cfg.clip is not None or cfg.clip_quantile is not None:
        if cfg.clip is not None:
            c = torch.tensor(float(cfg.clip), dtype=dt, device=d.device)
        else:
            c = _masked_quantile(d.detach(), mask, cfg.clip_quantile)
        clipped = (d.detach() > c) & mask
        d_used = torch.where(clipped, c, d)

    if cfg.agreement != "none":
        lv = _view_label_logprobs(view_logits, view_logprobs, y, cfg, dt)
        w = _agreement(lv, m, mask, cfg)
    else:
        w = torch.ones_like(m)
    kd = _reduce(d_used, m * w, cfg, num_items_in_batch)

    con = zero
    if cfg.contrastive_weight > 0:
        s = _gather(log_ps, y)
        a = _gather(log_pt, y).detach()
        if negative_logprobs is not None:
            b = _upcast(negative_logprobs).to(dt)
        else:
            b = _gather(F.log_softmax(_upcast(negative_logits) / tau, -1), y)
        hinge = F.relu(cfg.contrastive_margin + (s - a).abs() - (s - b.detach()).abs())
        con = _reduce(hinge, m, cfg, num_items_in_batch)

    feat = zero
    if cfg.feature_weight > 0:
        diff = _upcast(student_hidden) - _upcast(teacher_hidden).detach()
        f = diff.pow(2).sum(-1) / diff.shape[-1]
        feat = _reduce(f, m, cfg, num_items_in_batch)

    loss = cfg.kd_weight * kd + cfg.contrastive_weight * con + cfg.feature_weight * feat
    return EagerOutput(loss, kd.detach(), con.detach(), feat.detach(), d.detach(), w, clipped)


def eager_loss(config, **inputs) -> torch.Tensor:
    """Only the scalar loss of ``eager_unisd_loss``."""
    return eager_unisd_loss(**inputs, config=config).loss


@functools.cache
def compiled_loss(config, dynamic: bool | None = False):
    """torch.compile of ``eager_loss`` for one config (cached per config)."""
    return torch.compile(functools.partial(eager_loss, config), dynamic=dynamic)
