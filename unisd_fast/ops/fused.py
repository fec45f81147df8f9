"""The fused UniSD loss on logits as one ``torch.autograd.Function`` over a ``RowBackend``.

Forward runs the stats pass and the length-N coefficient step (``coefficients.py``); backward
runs the gradient pass with grad_output folded into the two per-row coefficients, so the
logits are read twice and the gradient written once in all (docs/kernels.md, "Pass 1" and
"Pass 2"). For small inputs a backend's ``row_stats_and_grad`` returns the divergence
gradient from the forward's one call, and the backward only scales it (``scaled_grad``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ..backends.protocol import RowBackend, RowStats
from ..backends.shards.combine import VocabShards
from ..config import UniSDConfig
from .coefficients import combine


@dataclass(frozen=True)
class FusedCall:
    """Everything of one fused call but the two differentiable inputs (the student logits
    and hidden states). Tensors are validated and have a unit last stride. ``shards``: the
    logits are this rank's vocabulary shard of logits split over a group (labels in
    full-vocab ids), whose row stats and label log-probs are combined over it."""

    backend: RowBackend
    config: UniSDConfig
    teacher_logits: torch.Tensor
    labels: torch.Tensor
    views: list[torch.Tensor] | None = None
    view_logprobs: torch.Tensor | None = None
    negative_logits: torch.Tensor | None = None
    negative_logprobs: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    num_items_in_batch: float | torch.Tensor | None = None
    inplace_backward: bool = False
    old_logprobs: torch.Tensor | None = None
    needs_grad: bool = True
    view_mask: torch.Tensor | None = None
    shards: VocabShards | None = None


def score(backend: RowBackend, x, labels, tau: float, cfg: UniSDConfig):
    """Label log-probs of a view or negative (B, T, V) at temperature ``tau``."""
    return backend.label_logprob(x, labels, tau=tau, ignore_index=cfg.ignore_index)


def score_views(backend: RowBackend, views, labels, cfg: UniSDConfig):
    """(K, B, T) label log-probs of the K views: one call on the views stacked along the
    batch when they hold at most ``backend.stack_elements`` logits in all, one call per view
    otherwise."""
    if sum(v.numel() for v in views) > backend.stack_elements:
        return torch.stack([score(backend, v, labels, cfg.view_temperature, cfg)
                            for v in views])
    lp = score(backend, torch.cat(views), labels.repeat(len(views), 1), cfg.view_temperature,
               cfg)
    return lp.view(len(views), *labels.shape)


def scored_options(call: FusedCall):
    """The views' and negative's label log-probs (K, B, T) and (B, T) that the config needs,
    scored by the backend where given as logits; None where not needed."""
    cfg, backend, labels = call.config, call.backend, call.labels
    if call.shards is not None:
        keep, local = labels != cfg.ignore_index, call.shards.local_labels(labels)
        scored = lambda x, tau: call.shards.score(x, local, keep, tau)  # noqa: E731
    view_lp = call.view_logprobs
    if cfg.agreement != "none" and view_lp is None:
        view_lp = score_views(backend, call.views, labels, cfg) if call.shards is None \
            else torch.stack([scored(v, cfg.view_temperature) for v in call.views])
    negative_lp = call.negative_logprobs
    if cfg.contrastive_weight > 0 and negative_lp is None:
        negative_lp = score(backend, call.negative_logits, labels, cfg.temperature, cfg) \
            if call.shards is None else scored(call.negative_logits, cfg.temperature)
    return view_lp, negative_lp


def sharded_stats(call: FusedCall, z, mask):
    """The row stats of the whole vocabulary from this rank's shard of the logits (zeros on
    ignored rows, as the backend's) and the shard-local labels the gradient pass reads."""
    cfg, labels = call.config, call.shards.local_labels(call.labels)
    stats = call.shards.row_stats(call.backend, z, call.teacher_logits, labels,
                                  divergence=cfg.divergence, tau=cfg.temperature,
                                  alpha=cfg.jsd_alpha)
    return RowStats(*(torch.where(mask, s, 0.0) for s in stats)), labels


def scaled_grad(z, labels, stats: RowStats, grad_rows, finite: bool, ck, cc, tau,
                cfg: UniSDConfig):
    """The logits gradient from the divergence gradient ``grad_rows`` the forward computed
    (d D / d z per row, 0 on ignored rows; ``row_stats_and_grad``): ck * grad_rows plus the
    hinge's cc * (onehot(y) - p_S) / tau, 0 on rows with ck = cc = 0; float32. Those rows
    are zeroed explicitly unless ``grad_rows`` is known to be ``finite`` (then 0 * G is 0).
    ``tau`` is the temperature, a float or a 0-dim tensor."""
    g = grad_rows * ck.unsqueeze(-1)
    if cfg.contrastive_weight > 0:
        c = (cc / tau).unsqueeze(-1)
        p_s = torch.exp(z.float() / tau - stats.lse_s.float().unsqueeze(-1))
        g.sub_(c * p_s)
        g.scatter_add_(-1, torch.where(labels != cfg.ignore_index, labels, 0).long()
                       .unsqueeze(-1), c)
    if finite and cfg.contrastive_weight == 0:
        return g
    return g.masked_fill_(((ck == 0) & (cc == 0)).unsqueeze(-1), 0.0)


class UniSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, student_hidden, call: FusedCall):
        cfg, backend, labels = call.config, call.backend, call.labels
        mask = labels != cfg.ignore_index
        scalars = {"divergence": cfg.divergence, "tau": cfg.temperature,
                   "alpha": cfg.jsd_alpha, "ignore_index": cfg.ignore_index}
        both = getattr(backend, "row_stats_and_grad", None)
        found = both(student_logits, call.teacher_logits, labels, **scalars) \
            if both is not None and call.needs_grad and call.shards is None else None
        if call.shards is not None:
            stats, labels = sharded_stats(call, student_logits, mask)
            grad_rows, finite = None, False
        elif found is None:
            stats = backend.row_stats(student_logits, call.teacher_logits, labels, **scalars)
            grad_rows, finite = None, False
        else:
            stats, grad_rows, finite = found
        view_lp, negative_lp = scored_options(call)
        out = combine(stats, mask, cfg, view_lp, negative_lp, student_hidden,
                      call.teacher_hidden, call.num_items_in_batch, call.view_mask,
                      call.old_logprobs)

        ctx.save_for_backward(student_logits, call.teacher_logits, labels, *stats, out.ck,
                              out.cc, out.hidden_grad, grad_rows)
        ctx.call = call
        ctx.finite = finite
        ctx.hidden_dtype = None if student_hidden is None else student_hidden.dtype
        ctx.mark_non_differentiable(out.kd, out.contrastive, out.feature, out.divergence,
                                    out.weight, out.clipped)
        return (out.loss, out.kd, out.contrastive, out.feature, out.divergence, out.weight,
                out.clipped)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        z, u, labels, *saved = ctx.saved_tensors
        stats, (ck, cc, hidden_grad, grad_rows) = RowStats(*saved[:7]), saved[7:]
        call = ctx.call
        cfg = call.config
        grad_z = grad_h = None
        g = grad_loss.float()
        if ctx.needs_input_grad[0] and grad_rows is not None:
            grad_z = scaled_grad(z, labels, stats, grad_rows, ctx.finite, ck * g, cc * g,
                                 cfg.temperature, cfg)
            grad_z = z.copy_(grad_z) if call.inplace_backward else grad_z.to(z.dtype)
        elif ctx.needs_input_grad[0]:
            grad_z = z if call.inplace_backward else torch.empty(z.shape, dtype=z.dtype,
                                                                 device=z.device)
            call.backend.write_grad(z, u, labels, grad_z, stats, ck * g, cc * g,
                                    divergence=cfg.divergence, tau=cfg.temperature,
                                    alpha=cfg.jsd_alpha)
        if ctx.needs_input_grad[1] and hidden_grad is not None:
            grad_h = (hidden_grad * g).to(ctx.hidden_dtype)
        return grad_z, grad_h, None


def unit_stride(x):
    """``x`` with a unit last stride (a copy only where it has none); None stays None."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def unisd_fused(student_logits, teacher_logits, labels, *, backend: RowBackend,
                config: UniSDConfig, views=None, view_logprobs=None, negative_logits=None,
                negative_logprobs=None, student_hidden=None, teacher_hidden=None,
                num_items_in_batch=None, inplace_backward=False, first=None, view_mask=None,
                shards=None, old_logprobs=None):
    """Run UniSDFunction; returns its seven outputs (loss, kd, contrastive, feature, D, w,
    clipped). Tensors whose last dimension is strided are made contiguous first. ``first``,
    a function ``(FusedCall, student_logits, student_hidden) -> outputs or None``, is tried
    before UniSDFunction (the CPU path's whole-loss call for small inputs, small.py), never
    with ``shards`` (a ``VocabShards``: the logits are this rank's vocabulary shard)."""
    if inplace_backward and student_logits.stride(-1) != 1:
        raise ValueError("inplace_backward=True needs student_logits with a unit last stride")
    call = FusedCall(
        backend=backend, config=config, teacher_logits=unit_stride(teacher_logits).detach(),
        labels=labels, views=None if views is None else [unit_stride(v) for v in views],
        view_logprobs=view_logprobs, negative_logits=unit_stride(negative_logits),
        negative_logprobs=negative_logprobs, teacher_hidden=teacher_hidden,
        num_items_in_batch=num_items_in_batch, inplace_backward=inplace_backward,
        needs_grad=torch.is_grad_enabled() and student_logits.requires_grad,
        view_mask=view_mask, shards=shards, old_logprobs=old_logprobs)
    z = unit_stride(student_logits)
    found = None if first is None or shards is not None else first(call, z, student_hidden)
    return found if found is not None else UniSDFunction.apply(z, student_hidden, call)
