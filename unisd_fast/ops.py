"""torch.autograd.Function of the fused UniSD loss over a row backend.

A backend is a module with ``row_stats``, ``label_logprob`` and ``write_grad``:
``unisd_fast.kernels`` (Triton) or ``unisd_fast.chunked`` (PyTorch, CPU). Forward runs the
stats pass and the length-N steps of ``coefficients``; backward runs the gradient pass with
grad_output folded into the per-row coefficients, so logits are read twice and the gradient
written once in all.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import coefficients as co


def _score(backend, x, labels, tau, cfg):
    return backend.label_logprob(x, labels, tau=tau, ignore_index=cfg.ignore_index)


class UniSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, student_hidden, teacher_logits, teacher_hidden, labels,
                extras, backend, cfg, num_items_in_batch, inplace_backward):
        views, view_lp, negative, negative_lp = extras
        tau = cfg.temperature
        mask = labels != cfg.ignore_index
        m = mask.float()
        lse_s, lse_t, d, aux, s_lab, t_lab = backend.row_stats(
            student_logits, teacher_logits, labels, divergence=cfg.divergence, tau=tau,
            alpha=cfg.jsd_alpha, ignore_index=cfg.ignore_index)

        c, clipped = co.clip_mask(d, mask, cfg)
        d_used = torch.where(clipped, c, d) if c is not None else d
        if cfg.agreement != "none":
            if view_lp is None:
                view_lp = torch.stack([_score(backend, v, labels, cfg.view_temperature, cfg)
                                       for v in views])
            w = co.agreement_weights(torch.where(mask, view_lp.float(), 0.0), mask, cfg)
        else:
            w = m
        kd_scale = co.token_scale(w, cfg.normalize, num_items_in_batch)
        kd = (kd_scale * d_used).sum()
        loss = cfg.kd_weight * kd
        ck = cfg.kd_weight * kd_scale * (~clipped)

        scale = co.token_scale(m, cfg.normalize, num_items_in_batch)
        contrastive = loss.new_zeros(())
        cc = torch.zeros_like(m)
        if cfg.contrastive_weight > 0:
            if negative_lp is None:
                negative_lp = _score(backend, negative, labels, tau, cfg)
            b_lab = torch.where(mask, negative_lp.float(), 0.0)
            hinge, sign = co.hinge(s_lab, t_lab, b_lab, cfg.contrastive_margin)
            contrastive = (scale * hinge).sum()
            loss = loss + cfg.contrastive_weight * contrastive
            cc = cfg.contrastive_weight * scale * sign

        feature = loss.new_zeros(())
        diff = None
        if cfg.feature_weight > 0:
            diff = torch.where(mask.unsqueeze(-1),
                               student_hidden.float() - teacher_hidden.float(), 0.0)
            feature = (scale * diff.pow(2).mean(-1)).sum()
            loss = loss + cfg.feature_weight * feature
            diff.mul_((cfg.feature_weight * 2.0 / diff.shape[-1]) * scale.unsqueeze(-1))

        ctx.save_for_backward(student_logits, teacher_logits, labels, lse_s, lse_t, d, aux,
                              ck, cc, diff)
        ctx.backend = backend
        ctx.cfg = cfg
        ctx.inplace_backward = inplace_backward
        ctx.hidden_dtype = None if student_hidden is None else student_hidden.dtype
        ctx.mark_non_differentiable(kd, contrastive, feature, d, w, clipped)
        return loss, kd, contrastive, feature, d, w, clipped

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        z, u, labels, lse_s, lse_t, d, aux, ck, cc, diff = ctx.saved_tensors
        cfg = ctx.cfg
        grad_z = grad_h = None
        g = grad_loss.float()
        if ctx.needs_input_grad[0]:
            grad_z = z if ctx.inplace_backward else torch.empty(z.shape, dtype=z.dtype,
                                                                device=z.device)
            ctx.backend.write_grad(z, u, labels, grad_z, (lse_s, lse_t, d, aux), ck * g, cc * g,
                                   divergence=cfg.divergence, tau=cfg.temperature,
                                   alpha=cfg.jsd_alpha)
        if ctx.needs_input_grad[1] and diff is not None:
            grad_h = (diff * g).to(ctx.hidden_dtype)
        return grad_z, grad_h, None, None, None, None, None, None, None, None


def unisd_fused(student_logits, teacher_logits, labels, *, backend, config, views=None,
                view_logprobs=None, negative_logits=None, negative_logprobs=None,
                student_hidden=None, teacher_hidden=None, num_items_in_batch=None,
                inplace_backward=False):
    """Run UniSDFunction; returns its seven outputs (loss, kd, contrastive, feature, D, w,
    clipped). Tensors whose last dimension is strided are made contiguous first."""
    def unit_stride(x):
        return x if x is None or x.stride(-1) == 1 else x.contiguous()

    if inplace_backward and student_logits.stride(-1) != 1:
        raise ValueError("inplace_backward=True needs student_logits with a unit last stride")
    views = None if views is None else [unit_stride(v) for v in views]
    return UniSDFunction.apply(
        unit_stride(student_logits), student_hidden, unit_stride(teacher_logits).detach(),
        teacher_hidden, labels,
        (views, view_logprobs, unit_stride(negative_logits), negative_logprobs),
        backend, config, num_items_in_batch, inplace_backward)
