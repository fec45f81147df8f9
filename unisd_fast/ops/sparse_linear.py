"""The fused-linear UniSD loss over a sparse support (docs/losses.md, "Sparse supports"):
chunk by chunk, the head GEMMs (the schedules of ``linear_chunks``), the backend's support
pass on the chunk's logits (the student's top-k merged over vocabulary tiles, or a given
support), the N x k divergence step, and the dense gradient written over the chunk's logits
and multiplied into d hidden, d weight, d bias. No tokens x vocab tensor exists."""

from __future__ import annotations

import torch

from ..backends.protocol import RowStats
from . import coefficients as co
from .linear_chunks import (
    Accumulators,
    Chunk,
    LinearCall,
    LinearResult,
    chunk_logits,
    chunk_ranges,
    hand_over,
    linear_result,
    old_rows,
    scatter_rows,
    scored_rows,
    tiled_sweep,
)
from .sparse import SparseTeacher, given_rows, grad_coefficients, support_divergence

N_ROW_VALUES = 3  # D, log p_S(y), log p_T(y) per scored row


def _chunk(buf, hs, ht, call: LinearCall, topk: bool) -> Chunk:
    """The chunk of student rows ``hs`` (and teacher rows ``ht`` for a top-k support). A
    given support has no teacher logits: its chunk is the student rows alone, passed as the
    stacked rows of the student head (one GEMM into the n rows of ``buf``)."""
    n = hs.shape[0]
    if not topk:
        return Chunk(buf[:n], hs, hs[:0], hs)
    return Chunk(buf[:2 * n], hs, ht, torch.cat([hs, ht]) if call.shared else None)


def run_sparse_chunks(call: LinearCall, teacher: SparseTeacher, index, values, scales,
                      b_lab, c, acc: Accumulators | None) -> None:
    """One pass over the chunks of the rows ``index``: logits, the support pass and the
    per-row D and label log-probs into ``values`` (3, len(index)); with ``acc`` also the
    gradient of each chunk into the accumulators (``c`` the clip constant)."""
    cfg, head = call.config, call.student_head
    V = head.weight.shape[0]
    topk = teacher.index is None
    parts = 2 if topk else 1
    tiled = call.vocab_tile is not None and acc is not None
    ranges = chunk_ranges(index.shape[0], parts, V, head.weight.element_size(),
                          call.chunk_bytes)
    if not ranges:
        return
    buf = torch.empty((parts * ranges[0][1], V), dtype=head.weight.dtype, device=index.device)
    pending = None
    for r0, r1 in ranges:
        idx = index[r0:r1]
        y, n = call.labels[idx], r1 - r0
        every = y != cfg.ignore_index  # all rows but where every row meets the head
        chunk = _chunk(buf, call.student_rows.index_select(0, idx),
                       call.teacher_rows.index_select(0, idx) if topk else None, call, topk)
        hs = chunk.hs
        if tiled:
            tiled_sweep(call, acc, chunk, pending)
        else:
            chunk_logits(call, chunk)
        z = chunk.logits[:n]
        u = chunk.logits[n:] if topk else None
        given = None if topk else teacher.index[idx].unsqueeze(0)
        rows = call.backend.support_stats(
            z.unsqueeze(0), None if u is None else u.unsqueeze(0), y.view(1, -1), given,
            k=teacher.k, tau=cfg.temperature, ignore_index=cfg.ignore_index)
        if topk:
            teacher_lp, t_lab = rows.teacher_lp, rows.teacher_label
        else:
            part = SparseTeacher(teacher.k, None, None, teacher.logprobs[idx],
                                 None if teacher.label_logprobs is None
                                 else teacher.label_logprobs[idx])
            teacher_lp, t_lab = given_rows(part, rows, y, every)
        d, A = support_divergence(rows.student_lp, teacher_lp, cfg)
        d, A = torch.where(every, d, 0.0), torch.where(every.unsqueeze(-1), A, 0.0)
        values[:, r0:r1] = torch.stack([d.float(), rows.student_label, t_lab])
        if acc is None:
            continue
        coeffs = co.row_coefficients(values[0, r0:r1], rows.student_label, t_lab,
                                     None if b_lab is None else b_lab[r0:r1],
                                     every, c,
                                     co.with_ratio(co.RowScales(*(s[r0:r1] for s in scales)),
                                                   rows.student_label,
                                                   None if call.old_logprobs is None
                                                   else call.old_logprobs[idx], cfg), cfg)
        coef, beta, cc = grad_coefficients(A, coeffs.ck, coeffs.cc)
        # with a soft-cap the chain rule needs z: the gradient goes over u (or a buffer)
        out = z
        if head.softcap is not None:
            out = u if u is not None else torch.empty_like(z)
        call.backend.support_grad(z.unsqueeze(0), out.unsqueeze(0), rows, beta, coef,
                                  y.view(1, -1), cc, tau=cfg.temperature)
        head.chain_(out, z)
        pending = hand_over(call, acc, out, hs, r0, tiled)
    if pending is not None:
        tiled_sweep(call, acc, None, pending)


def sparse_linear_loss(call: LinearCall, teacher: SparseTeacher, shape, view_rows, view_lp,
                       negative_rows, negative_lp, student_hidden, teacher_hidden,
                       num_items_in_batch, view_mask=None) -> LinearResult:
    """The whole fused-linear loss on a sparse support; ``teacher`` holds the given support
    as (N, k) rows (or only k, for the student's top-k). Views and negative are scored first
    (``linear_chunks.score_rows``); ``clip_quantile`` adds a pass for the divergences."""
    cfg = call.config
    N = call.labels.shape[0]
    mask = call.labels != cfg.ignore_index
    index, view_lp, negative_lp, scales, b_lab = scored_rows(
        call, shape, view_rows, view_lp, negative_rows, negative_lp, num_items_in_batch,
        view_mask)
    values = torch.zeros(N_ROW_VALUES, index.shape[0], device=index.device)
    acc = Accumulators(call, index.shape[0]) if any(call.grads) else None
    if cfg.clip_quantile is not None and acc is not None:
        run_sparse_chunks(call, teacher, index, values, scales, b_lab, None, None)
    c = co.clip_threshold(values[0], mask[index], cfg)
    run_sparse_chunks(call, teacher, index, values, scales, b_lab, c, acc)

    d, s_lab, t_lab = scatter_rows(values, index, N).view(N_ROW_VALUES, *shape)
    zeros = torch.zeros_like(d)
    stats = RowStats(zeros, zeros, d, zeros, s_lab, t_lab, zeros)
    terms = co.combine(stats, mask.view(shape), cfg, view_lp, negative_lp, student_hidden,
                       teacher_hidden, num_items_in_batch, view_mask, old_rows(call, shape))
    return linear_result(call, terms, acc, index, student_hidden)


class SparseLinearFunction(torch.autograd.Function):
    """The loss of ``sparse_linear_loss`` with the gradients it computed attached: backward
    scales them by grad_output, in place."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, run):
        with torch.no_grad():
            result = run()
        t = result.terms
        ctx.save_for_backward(*(g if g is not None else student_hidden.new_empty(0)
                                for g in (result.grad_hidden, result.grad_weight,
                                          result.grad_bias)))
        ctx.mark_non_differentiable(t.kd, t.contrastive, t.feature, t.divergence, t.weight,
                                    t.clipped)
        return t.loss, t.kd, t.contrastive, t.feature, t.divergence, t.weight, t.clipped

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        g = grad_loss.float()
        # in place: the Function owns these gradients and hands them over without a copy
        # (a weight-sized one included); a second backward fails autograd's version check
        grads = [None if x.numel() == 0 or not need else x.mul_(g.to(x.dtype))
                 for x, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:3], strict=True)]
        return (*grads, None)
