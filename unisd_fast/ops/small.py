"""Small CPU inputs in one call: stats, coefficient step and gradients together.

For CPU inputs of at most ``TorchSettings.small_elements`` logits whose student needs a
gradient, the whole fused loss runs as one function per divergence (``WHOLE``), compiled by
the ``TorchBackend``'s compiler: the one-call stats-and-gradient pass (mean-shifted for fkl
and rkl), the label log-probs of the views and the negative, the coefficient step of
``coefficients.combine`` and the final logits and hidden-state gradients.
``GradientFunction``'s backward only multiplies those by grad_output. At these sizes the time
goes to per-call overhead, so one compiled call instead of one per step is what matters
(docs/kernels.md, "Small inputs"). A call whose shifted pass flags a row (a non-finite logit)
is declined, and ``fused.UniSDFunction`` runs it instead.
"""

from __future__ import annotations

import torch

from ..backends.pytorch import TorchBackend, passes
from ..backends.pytorch.compiler import specialise
from ..config import DIVERGENCES
from .coefficients import combine
from .fused import FusedCall, scaled_grad


def _labels(x, y, keep, tau):
    """log softmax(x / tau)[y] of (..., B, T, V) logits at the (B, T) labels ``y``."""
    V = x.shape[-1]
    reps = x.numel() // (y.numel() * V)
    lp = passes.label_block(x.reshape(-1, V), y.reshape(-1).repeat(reps),
                            keep.reshape(-1).repeat(reps), tau)
    return lp.view(x.shape[:-1])


def whole(z, u, y, views, view_lp, negative, negative_lp, sh, th, num_items, view_mask, old_lp,
          tau, alpha, cfg, divergence: str):
    """The fused loss of docs/losses.md on small inputs, the views stacked (K, B, T, V):
    (loss, kd, contrastive, feature, D, weight, clipped, d loss / d z, d loss / d h or None,
    ok), where ``ok`` is False when the shifted pass flagged a row (the results are then not
    used) and None for jsd, whose general pass takes every input."""
    B, T, V = z.shape
    n = B * T
    keep = y != cfg.ignore_index
    args = (z.reshape(n, V), u.reshape(n, V), y.reshape(n), keep.reshape(n), tau, alpha)
    ok = None
    if divergence == "jsd":
        values, grad_rows = passes.stats_grad(*args, divergence)
    else:
        values, grad_rows, flags = passes.stats_grad_shifted(*args[:5], divergence)
        ok = flags.all()
    stats = passes.row_stats(values, B, T)
    if views is not None:
        view_lp = _labels(views, y, keep, cfg.view_temperature)
    if negative is not None:
        negative_lp = _labels(negative, y, keep, tau)
    out = combine(stats, keep, cfg, view_lp, negative_lp, sh, th, num_items, view_mask, old_lp)
    grad = scaled_grad(z, y, stats, grad_rows.view(B, T, V), divergence != "jsd", out.ck,
                       out.cc, tau, cfg)
    return (out.loss, out.kd, out.contrastive, out.feature, out.divergence, out.weight,
            out.clipped, grad, out.hidden_grad, ok)


WHOLE = {d: specialise(whole, divergence=d) for d in DIVERGENCES}


class GradientFunction(torch.autograd.Function):
    """The loss value with the gradients the forward already computed attached: backward
    scales them by grad_output (and writes the logits gradient into the logits themselves
    under ``inplace_backward``)."""

    @staticmethod
    def forward(ctx, student_logits, student_hidden, loss, grad_z, grad_h, inplace: bool):
        ctx.save_for_backward(student_logits if inplace else None, grad_z, grad_h)
        ctx.dtypes = (student_logits.dtype,
                      None if student_hidden is None else student_hidden.dtype)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        z, grad_z, grad_h = ctx.saved_tensors
        g = grad_loss.float()
        dz = dh = None
        if ctx.needs_input_grad[0]:
            dz = grad_z * g
            dz = z.copy_(dz) if z is not None else dz.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1] and grad_h is not None:
            dh = (grad_h * g).to(ctx.dtypes[1])
        return dz, dh, None, None, None, None


def _float32(x):
    """A float tensor as float32 and detached (one compiled graph for every input dtype),
    another tensor detached, anything else as it is."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().float() if x.is_floating_point() else x.detach()


def run(call: FusedCall, student_logits, student_hidden):
    """The seven outputs of ``fused.unisd_fused`` from one call, or None where this path
    declines: not a CPU ``TorchBackend`` call that needs a gradient, more than
    ``small_elements`` logits (or more than ``stack_elements`` of views), or a row the
    shifted pass flagged."""
    z, backend = student_logits, call.backend
    if not (isinstance(backend, TorchBackend) and z.device.type == "cpu" and call.needs_grad):
        return None
    small = z.numel() <= backend.settings.small_elements and (
        call.views is None or sum(v.numel() for v in call.views) <= backend.stack_elements)
    if not small:
        return None
    cfg, compiler = call.config, backend.compiler
    # every tensor input detached: the compiled call records no autograd graph
    views = None if call.views is None else torch.stack([v.detach() for v in call.views])
    args = [_float32(x) for x in (
        z, call.teacher_logits, call.labels, views, call.view_logprobs, call.negative_logits,
        call.negative_logprobs, student_hidden, call.teacher_hidden, call.num_items_in_batch,
        call.view_mask, call.old_logprobs)]
    *outs, grad_z, grad_h, ok = compiler.run(
        WHOLE[cfg.divergence], *args, compiler.scalar(cfg.temperature, z),
        compiler.scalar(cfg.jsd_alpha, z, torch.float64), cfg, mark_rows=False)
    if ok is not None and not bool(ok):
        return None
    loss = GradientFunction.apply(z, student_hidden, outs[0], grad_z, grad_h,
                                  call.inplace_backward)
    return (loss, *outs[1:])
