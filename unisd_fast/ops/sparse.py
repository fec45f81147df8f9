"""The UniSD loss over a sparse support (docs/losses.md, "Sparse supports"): the divergence
over the support's categories and its gradient wrt the student's support log-probs (closed
forms, float64, N x k work), the length-N step of ``coefficients.combine`` on it, and the
autograd Function of the logits form over a backend's support passes.

The support is the student's top-k (``config.topk``; the teacher's log-probs at those
indices from its logits) or given indices with given teacher log-probs. The student's
log-probs there come from its full log-sum-exp, so the gradient wrt its logits is dense:
dz_v = (A_v [v in S] - (sum_S A) p_S(v)) / tau with A = d D / d log p_S on the support.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ..backends.protocol import RowBackend, RowStats
from ..backends.support import SupportRows
from ..config import TAIL_LOG_MASS_CAP, UniSDConfig
from .coefficients import Coefficients, combine
from .fused import FusedCall, scored_options, unit_stride

TAIL_FLOOR = -math.expm1(TAIL_LOG_MASS_CAP)


def _xlogy(p, diff):
    """p * diff, 0 where p == 0."""
    return torch.where(p == 0, 0.0, p * torch.where(p == 0, 0.0, diff))


# Categories of the support from the log-probs lp (n x k) of its tokens, and the chain back:
#   tail:   c = (lp, log t), t = max(1 - sum exp(lp), TAIL_FLOOR);
#           d c_tail / d lp_j = -exp(lp_j) / t (0 where t is at its floor)
#   renorm: c = lp - log P, P = sum exp(lp);   d c_i / d lp_j = [i = j] - exp(c_j)
# ``chain(G)`` maps d D / d c to d D / d lp.
def categories(lp, tail: bool):
    p = lp.exp()
    if tail:
        t = 1.0 - p.sum(-1, keepdim=True)
        floored = t < TAIL_FLOOR
        t = torch.clamp(t, min=TAIL_FLOOR)
        cats = torch.cat([lp, t.log()], dim=-1)

        def chain(G):
            g_tail = torch.where(floored, 0.0, G[:, -1:])
            return G[:, :-1] - g_tail * p / t
        return cats, chain
    cats = lp - torch.logsumexp(lp, dim=-1, keepdim=True)

    def chain(G):
        return G - cats.exp() * G.sum(-1, keepdim=True)
    return cats, chain


# D over the categories, c_S the student's and c_T the teacher's log-probs, r = e^c_S,
# q = e^c_T, and G = d D / d c_S:
#   fkl: D = sum q (c_T - c_S),        G = -q
#   rkl: D = sum r (c_S - c_T),        G = r (c_S - c_T + 1)
#   jsd: m = log((1-a) r + a q), D = a sum q (c_T - m) + (1-a) sum r (c_S - m),
#        G = (1-a) r (c_S - m)
def category_divergence_grad(cs, ct, kind: str, alpha: float):
    r, q = cs.exp(), ct.exp()
    if kind == "fkl":
        return _xlogy(q, ct - cs).sum(-1), -q
    if kind == "rkl":
        return _xlogy(r, cs - ct).sum(-1), _xlogy(r, cs - ct + 1.0)
    both = (r == 0) & (q == 0)
    m = torch.logaddexp(torch.where(both, 0.0, cs + math.log1p(-alpha)),
                        torch.where(both, 0.0, ct + math.log(alpha)))
    d = alpha * _xlogy(q, ct - m).sum(-1) + (1 - alpha) * _xlogy(r, cs - m).sum(-1)
    return d, (1 - alpha) * _xlogy(r, cs - m)


def support_divergence(student_lp, teacher_lp, cfg: UniSDConfig):
    """(D, A): per-row D over the support (n) and A = d D / d log p_S (n x k), float64."""
    cs, chain = categories(student_lp, cfg.tail_bucket)
    ct, _ = categories(teacher_lp, cfg.tail_bucket)
    d, G = category_divergence_grad(cs, ct, cfg.divergence, cfg.jsd_alpha)
    return d, chain(G)


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher of a sparse loss: its logits (top-k support of the student, ``k``), or a
    given support ``index`` with ``logprobs`` (B, T, k) and optionally the label log-probs
    ``label_logprobs`` (B, T)."""

    k: int
    logits: torch.Tensor | None = None
    index: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    label_logprobs: torch.Tensor | None = None


def given_rows(teacher: SparseTeacher, rows: SupportRows, labels, mask):
    """(log p_T on the support (N x k, float64), the teacher's label log-probs (N)) of a
    given support; 0 on ignored rows."""
    keep = mask.reshape(-1)
    lt = torch.where(keep.unsqueeze(-1), teacher.logprobs.reshape(keep.shape[0], -1).double(),
                     0.0)
    if teacher.label_logprobs is not None:
        lab = teacher.label_logprobs.reshape(-1).float()
    else:
        at = rows.index == labels.reshape(-1, 1)
        lab = torch.where(at, lt, 0.0).sum(-1).float()
    return lt, torch.where(keep, lab, 0.0)


def sparse_terms(rows: SupportRows, teacher_lp, teacher_label, mask, cfg, view_lp,
                 negative_lp, student_hidden, teacher_hidden, num_items_in_batch, old_lp,
                 view_mask=None):
    """The loss terms of ``combine`` on a sparse support, and A (N x k, 0 on ignored rows)."""
    keep = mask.reshape(-1)
    d, A = support_divergence(rows.student_lp, teacher_lp, cfg)
    d = torch.where(keep, d, 0.0)
    A = torch.where(keep.unsqueeze(-1), A, 0.0)
    zeros = torch.zeros_like(keep, dtype=torch.float32)
    stats = RowStats(rows.lse_s.float(), zeros, d.float(), zeros, rows.student_label,
                     teacher_label, zeros)
    stats = RowStats(*(s.view(mask.shape) for s in stats))
    out = combine(stats, mask, cfg, view_lp, negative_lp, student_hidden, teacher_hidden,
                  num_items_in_batch, view_mask, old_lp)
    return out, A


def grad_coefficients(A, ck, cc):
    """(coef, beta, cc) of the gradient pass: coef = ck A on the support, beta = sum coef +
    cc, from the per-row ck, cc (grad_output folded in)."""
    coef = A * ck.reshape(-1, 1).double()
    beta = coef.sum(-1) + cc.reshape(-1).double()
    return coef, beta, cc.reshape(-1)


def teacher_side(teacher: SparseTeacher, rows: SupportRows, labels, mask):
    """(log p_T on the support, the teacher's label log-probs) of either support kind."""
    if teacher.logits is not None:
        return rows.teacher_lp, rows.teacher_label
    return given_rows(teacher, rows, labels, mask)


class SparseFunction(torch.autograd.Function):
    """Forward: the support pass, the N x k divergence step and ``combine``; backward: one
    dense gradient write with grad_output folded into the per-row coefficients."""

    @staticmethod
    def forward(ctx, student_logits, student_hidden, call: FusedCall, t: SparseTeacher):
        cfg, backend, labels = call.config, call.backend, call.labels
        mask = labels != cfg.ignore_index
        rows = backend.support_stats(student_logits, t.logits, labels, t.index, k=t.k,
                                     tau=cfg.temperature, ignore_index=cfg.ignore_index)
        view_lp, negative_lp = scored_options(call)
        teacher_lp, teacher_label = teacher_side(t, rows, labels, mask)
        out, A = sparse_terms(rows, teacher_lp, teacher_label, mask, cfg, view_lp,
                              negative_lp, student_hidden, call.teacher_hidden,
                              call.num_items_in_batch, call.old_logprobs, call.view_mask)
        ctx.save_for_backward(student_logits, labels, *rows[:2], A, out.ck, out.cc,
                              out.hidden_grad)
        ctx.call = call
        ctx.hidden_dtype = None if student_hidden is None else student_hidden.dtype
        return outputs(ctx, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        z, labels, lse_s, index, A, ck, cc, hidden_grad = ctx.saved_tensors
        call = ctx.call
        g = grad_loss.float()
        grad_z = grad_h = None
        if ctx.needs_input_grad[0]:
            grad_z = z if call.inplace_backward else torch.empty_like(z)
            coef, beta, c = grad_coefficients(A, ck * g, cc * g)
            rows = SupportRows(lse_s, index, None, None, None, None)
            call.backend.support_grad(z, grad_z, rows, beta, coef, labels, c,
                                      tau=call.config.temperature)
        if ctx.needs_input_grad[1] and hidden_grad is not None:
            grad_h = (hidden_grad * g).to(ctx.hidden_dtype)
        return grad_z, grad_h, None, None


def outputs(ctx, out: Coefficients):
    """The seven outputs of a loss Function, the diagnostics non-differentiable."""
    ctx.mark_non_differentiable(out.kd, out.contrastive, out.feature, out.divergence,
                                out.weight, out.clipped)
    return (out.loss, out.kd, out.contrastive, out.feature, out.divergence, out.weight,
            out.clipped)


def unisd_sparse(student_logits, labels, *, backend: RowBackend, config: UniSDConfig,
                 teacher: SparseTeacher, views=None, view_logprobs=None, negative_logits=None,
                 negative_logprobs=None, student_hidden=None, teacher_hidden=None,
                 num_items_in_batch=None, inplace_backward=False, old_logprobs=None,
                 view_mask=None):
    """Run SparseFunction; returns its seven outputs (loss, kd, contrastive, feature, D, w,
    clipped)."""
    if inplace_backward and student_logits.stride(-1) != 1:
        raise ValueError("inplace_backward=True needs student_logits with a unit last stride")
    teacher = SparseTeacher(teacher.k, unit_stride(teacher.logits), teacher.index,
                            teacher.logprobs, teacher.label_logprobs)
    call = FusedCall(
        backend=backend, config=config, teacher_logits=teacher.logits, labels=labels,
        views=None if views is None else [unit_stride(v) for v in views],
        view_logprobs=view_logprobs, negative_logits=unit_stride(negative_logits),
        negative_logprobs=negative_logprobs, teacher_hidden=teacher_hidden,
        num_items_in_batch=num_items_in_batch, inplace_backward=inplace_backward,
        old_logprobs=old_logprobs, view_mask=view_mask)
    return SparseFunction.apply(unit_stride(student_logits), student_hidden, call, teacher)
