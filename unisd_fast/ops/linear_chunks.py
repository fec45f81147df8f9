"""The fused-linear UniSD loss over chunks of rows: head GEMMs, the row backend on each
chunk's logits, and the gradients wrt the hidden states and the head, computed at once.

Plain tensors in and out, no autograd (``linear_op.py`` registers it as an operator). Nothing
of size tokens x vocab exists: only one chunk's logits, ``chunk_bytes`` at most (at least one
row). docs/kernels.md, "The fused-linear form", describes the passes and the two schedules.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..backends.protocol import RowBackend, RowStats
from ..backends.shards.combine import VocabShards
from ..config import UniSDConfig
from . import coefficients as co
from .coefficients import Coefficients, combine
from .head import LinearHead
from .tiles import run_shares, shares, tile_ranges

N_STATS = len(RowStats._fields)


@dataclass(frozen=True)
class LinearCall:
    """One call of the fused-linear loss, with (N, H) row views of the hidden states.

    The two heads share their soft-cap and scale. ``shared``: the teacher head is the
    student head (same weight and bias tensors), so the student and teacher rows of a chunk
    go through one GEMM. ``grads``: which of d hidden, d weight, d bias to compute.
    ``vocab_tile``: head rows per tile of the tiled schedule (``run_chunks``), None for
    whole-head GEMMs. ``shards``: the heads are this rank's vocabulary shard of a head split
    over a group (their rows, labels in full-vocab ids), whose row stats, label log-probs
    and d hidden are combined over it; None for a whole head.
    """

    backend: RowBackend
    config: UniSDConfig
    student_head: LinearHead
    teacher_head: LinearHead
    shared: bool
    student_rows: torch.Tensor
    teacher_rows: torch.Tensor
    labels: torch.Tensor
    chunk_bytes: int
    grads: tuple[bool, bool, bool]
    vocab_tile: int | None = None
    old_logprobs: torch.Tensor | None = None
    shards: VocabShards | None = None


@dataclass
class LinearResult:
    """The loss terms of ``combine`` and the gradients (None where not asked for), float32
    accumulators cast to the dtypes of the inputs they belong to."""

    terms: Coefficients
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


# With d W asked for on the whole-head schedule, each chunk adds its products into the
# (V, H) float32 accumulator: one read and one write of it per chunk. A chunk then holds at
# least WEIGHT_CHUNK_ROWS rows (capped at the accumulator's own bytes), so a step makes
# N / 2048 passes over d W: at H = 3584, V = 152064, bf16 and 256 MiB chunks, 19 chunks of
# 441 rows (83 GB of accumulator traffic at N = 8192) become 4 of 2048 (17 GB), for 1.25 GB
# of chunk logits beside the 2.18 GB accumulator.
WEIGHT_CHUNK_ROWS = 2048
# Devices on which every row meets the head, ignored ones included (they come out with zero
# coefficients, stats and gradient), so that no host sync waits for the count of kept rows;
# elsewhere only the kept rows do (``mask.nonzero()``: one sync, no GEMM rows wasted).
ALL_ROWS_DEVICES = frozenset({"cuda"})


def chunk_ranges(N: int, parts: int, V: int, itemsize: int, chunk_bytes: int):
    """[r0, r1) ranges of N rows such that ``parts`` logits rows per row fit ``chunk_bytes``
    (at least one row per chunk)."""
    rows = max(1, chunk_bytes // (parts * V * itemsize))
    return [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]


def head_logits(out: torch.Tensor, head: LinearHead, rows, cols: slice = slice(None)) -> None:
    """out = f(h W[cols]^T + b[cols]) for the row blocks ``rows`` [h_i], stacked in order
    along the rows of ``out``: one GEMM over all blocks (the bias added in it, rounded once).
    ``cols`` selects head rows (a vocabulary tile); ``out`` may be a column slice."""
    h = rows[0] if len(rows) == 1 else torch.cat(rows)
    w = head.weight[cols].t()
    if head.bias is None:
        torch.mm(h, w, out=out)
    else:
        torch.addmm(head.bias[cols], h, w, out=out)
    head.map_(out)


# log softmax(f(h W^T + b) / tau)[y] of each row of h, by one sweep over tiles of the head:
# per tile x = f(h W_tile^T + b_tile) / tau, an online log-sum-exp (running max m, float64
# sum s of exp(x - shift), shift = m where finite, rescaled by exp(shift_old - shift_new)
# when the max grows) and the label's logit taken from the tile that holds it. Each worker
# sweeps its share of the tiles (``tiles.run_shares``); the shares' (m, s) merge the same
# way, s = sum_w s_w exp(shift_w - shift). At the end lp = x_y - (shift + log s), NaN where
# that log-sum-exp is not finite (a row holding +inf, as in the reference).
def _online_lse(call: LinearCall, h, y, tau, share):
    head = call.teacher_head
    m = torch.full((h.shape[0],), float("-inf"), device=h.device)
    total = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
    label = torch.zeros(h.shape[0], device=h.device)
    shift = torch.zeros_like(m)
    for v0, v1 in share:
        x = torch.empty((h.shape[0], v1 - v0), dtype=head.weight.dtype, device=h.device)
        head_logits(x, head, [h], slice(v0, v1))
        x = x.float().div_(tau)
        m_new = torch.maximum(m, x.amax(1))
        new_shift = torch.where(m_new.isfinite(), m_new, 0.0)
        total = total * torch.exp(shift - new_shift).double() + torch.exp(
            x - new_shift.unsqueeze(1)).sum(1, dtype=torch.float64)
        at = (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
        label = torch.where((y >= v0) & (y < v1), x.gather(1, at).squeeze(1), label)
        m, shift = m_new, new_shift
    holds = torch.zeros_like(y, dtype=torch.bool)
    for v0, v1 in share:
        holds |= (y >= v0) & (y < v1)
    return m, shift, total, label, holds


def label_logprobs_tiled(call: LinearCall, h, y, tau):
    V = call.teacher_head.weight.shape[0]
    parts = run_shares(lambda share: _online_lse(call, h, y, tau, share),
                       tile_ranges(V, call.vocab_tile or V))
    m = functools.reduce(torch.maximum, [p[0] for p in parts])
    shift = torch.where(m.isfinite(), m, 0.0)
    total = sum(p[2] * torch.exp(p[1] - shift).double() for p in parts)
    label = parts[0][3]
    for p in parts[1:]:
        label = torch.where(p[4], p[3], label)
    lse = shift.double() + total.log()
    if call.shards is not None:
        holds = functools.reduce(torch.logical_or, [p[4] for p in parts])
        return call.shards.label_logprobs(lse, label, holds)
    return torch.where(lse.isfinite(), label.double() - lse, float("nan")).float()


def score_rows_tiled(call: LinearCall, index: torch.Tensor, groups):
    """``score_rows`` for the tiled schedule: every row of every tensor in one sweep over
    the head tiles (in blocks of rows whose tile logits, and their exponentials, fit
    ``chunk_bytes``), so the head is read once for all of them."""
    tensors = [(x, tau) for xs, tau in groups for x in xs]
    n_rows, labels = index.shape[0], row_labels(call, index)
    lp = torch.empty(len(tensors), n_rows, dtype=torch.float32, device=index.device)
    tile = call.vocab_tile or call.shards.layout.widest
    block = max(1, call.chunk_bytes // (8 * tile * len(tensors)))
    for r0 in range(0, n_rows, block):
        idx, y = index[r0:r0 + block], labels[r0:r0 + block]
        h = torch.cat([x.index_select(0, idx) for x, _ in tensors])
        tau = torch.cat([torch.full((idx.shape[0], 1), t, device=h.device)
                         for _, t in tensors])
        values = label_logprobs_tiled(call, h, y.repeat(len(tensors)), tau)
        lp[:, r0:r0 + block] = values.view(len(tensors), -1)
    return list(lp.split([len(xs) for xs, _ in groups]))


def score_rows(call: LinearCall, index: torch.Tensor, groups):
    """Label log-probs through the teacher head of the rows ``index`` of the (N, Ht) tensors
    in ``groups`` [(list of tensors, tau)]: one GEMM per chunk over every tensor of every
    group, then one label pass per group. Returns a float32 (P_g, len(index)) per group."""
    if call.vocab_tile is not None or call.shards is not None:
        return score_rows_tiled(call, index, groups)
    head, V = call.teacher_head, call.teacher_head.weight.shape[0]
    tensors = [x for xs, _ in groups for x in xs]
    P, n_rows = len(tensors), index.shape[0]
    outs = [torch.zeros(len(xs), n_rows, dtype=torch.float32, device=index.device)
            for xs, _ in groups]
    ranges = chunk_ranges(n_rows, P, V, head.weight.element_size(), call.chunk_bytes)
    buf = torch.empty((ranges[0][1] * P if ranges else 0, V), dtype=head.weight.dtype,
                      device=head.weight.device)
    labels = call.labels[index]
    for r0, r1 in ranges:
        n, idx = r1 - r0, index[r0:r1]
        logits = buf[:P * n]
        head_logits(logits, head, [x.index_select(0, idx) for x in tensors])
        first = 0
        for (xs, tau), out in zip(groups, outs, strict=True):
            rows = logits[first * n:(first + len(xs)) * n]
            y = labels[r0:r1].repeat(len(xs))
            lp = call.backend.label_logprob(rows.view(1, -1, V), y.view(1, -1), tau=tau,
                                            ignore_index=call.config.ignore_index)
            out[:, r0:r1] = lp.view(len(xs), n)
            first += len(xs)
    return outs


def row_labels(call: LinearCall, index: torch.Tensor) -> torch.Tensor:
    """The labels of the rows ``index``, in ids of this rank's shard where the head is one."""
    labels = call.labels[index]
    return labels if call.shards is None else call.shards.local_labels(labels)


def chunk_stats(call: LinearCall, z, u, y) -> RowStats:
    """The row stats of a chunk's logits: the backend's, or over a split head those of the
    whole vocabulary, combined over the group."""
    cfg = call.config
    z, u, y = z.unsqueeze(0), u.unsqueeze(0), y.view(1, -1)
    if call.shards is not None:
        return call.shards.row_stats(call.backend, z, u, y, divergence=cfg.divergence,
                                     tau=cfg.temperature, alpha=cfg.jsd_alpha)
    return call.backend.row_stats(z, u, y, divergence=cfg.divergence, tau=cfg.temperature,
                                  alpha=cfg.jsd_alpha, ignore_index=cfg.ignore_index)


def chunk_grad(call: LinearCall, z, u, y, stats: RowStats, rows: co.RowCoefficients):
    """d loss / d x of the chunk's pre-``f`` student logits x, written over z (or over u when
    f has a soft-cap, whose derivative needs z). Returns the tensor that holds it."""
    cfg = call.config
    out = u if call.student_head.softcap is not None else z
    V = z.shape[-1]
    call.backend.write_grad(z.view(1, -1, V), u.view(1, -1, V), y.view(1, -1),
                            out.view(1, -1, V), RowStats(*(s.view(1, -1) for s in stats)),
                            rows.ck.view(1, -1), rows.cc.view(1, -1),
                            divergence=cfg.divergence, tau=cfg.temperature,
                            alpha=cfg.jsd_alpha)
    call.student_head.chain_(out, z)
    return out


_MIXED_ADDMM: dict = {}


def mixed_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc32, a16, b16, out_dtype=float32, out=acc32)`` (a 16-bit GEMM
    accumulating into float32, CUDA only) runs and is right here; probed once per device
    and dtype on a tiny product. Otherwise the chunk is upcast to float32 first."""
    key = (device.type, dtype)
    if key not in _MIXED_ADDMM:
        ok = False
        if device.type == "cuda":
            a = torch.arange(6, device=device, dtype=dtype).view(2, 3)
            acc = torch.ones(2, 2, device=device)
            try:
                torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
                ok = torch.equal(acc.cpu(), torch.tensor([[6.0, 15.0], [15.0, 51.0]]))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _MIXED_ADDMM[key] = ok
    return _MIXED_ADDMM[key]


class Accumulators:
    """float32 d hidden (of the ``n_rows`` rows scored), d weight (V, H) and d bias (V,), for
    the gradients asked for.

    In the tiled schedule with rows to score, d W is not zeroed: the first chunk's products
    overwrite it (``weight_beta`` 0 during the first sweep with products, then 1), which
    saves a pass over a weight-sized buffer.
    """

    def __init__(self, call: LinearCall, n_rows: int):
        w = call.student_head.weight
        want_h, want_w, want_b = call.grads
        self.hidden = (torch.zeros((n_rows, w.shape[1]), dtype=torch.float32, device=w.device)
                       if want_h else None)
        overwrite = call.vocab_tile is not None and n_rows > 0
        self.weight_beta = 0.0 if overwrite else 1.0
        self.weight = ((torch.empty if overwrite else torch.zeros)(
            w.shape, dtype=torch.float32, device=w.device) if want_w else None)
        self.bias = (torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
                     if want_b else None)

    def add(self, call: LinearCall, grad: torch.Tensor, h: torch.Tensor, r0: int) -> None:
        """d h = dx W for the chunk's rows (from r0); d W += dx^T h; d b += sum_rows dx."""
        w = call.student_head.weight
        if self.hidden is not None:
            rows = self.hidden[r0:r0 + grad.shape[0]]
            if w.dtype == torch.float32:
                torch.mm(grad, w, out=rows)
            else:
                rows.copy_(torch.mm(grad, w))
        if self.weight is not None:
            if grad.dtype == torch.float32:
                self.weight.addmm_(grad.t(), h)
            elif mixed_addmm_works(grad.device, grad.dtype):
                torch.addmm(self.weight, grad.t(), h, out_dtype=torch.float32, out=self.weight)
            else:
                self.weight.addmm_(grad.t().float(), h.float())
        if self.bias is not None:
            self.bias.add_(grad.sum(0, dtype=torch.float32))

    def add_tile(self, call: LinearCall, pending: Pending, v0: int, v1: int,
                 hidden: torch.Tensor | None) -> None:
        """``add`` restricted to head rows v0:v1, accumulated: d h += dx[:, v0:v1] W[v0:v1]
        into ``hidden`` (the pending rows' d h, or a worker's partial sum of it; float32
        operands, so a 16-bit head's products are summed over tiles in float32)."""
        w = call.student_head.weight[v0:v1].float()
        g = pending.grad[:, v0:v1].float()
        if hidden is not None:
            hidden.addmm_(g, w)
        if self.weight is not None:
            self.weight[v0:v1].addmm_(g.t(), pending.h, beta=self.weight_beta)
        if self.bias is not None:
            self.bias[v0:v1].add_(g.sum(0))


@dataclass(frozen=True)
class Pending:
    """A chunk whose gradient ``grad`` (rows x V, in the logits buffer) is written and whose
    products with the head are still due: its hidden rows ``h`` (float32, made once for all
    tiles) start at row ``r0``."""

    grad: torch.Tensor
    h: torch.Tensor
    r0: int


@dataclass(frozen=True)
class Chunk:
    """A chunk's logits buffer (2 n, V) and its student and teacher hidden rows (n each);
    ``stacked`` is both, stacked, for a shared head (one GEMM), else None."""

    logits: torch.Tensor
    hs: torch.Tensor
    ht: torch.Tensor
    stacked: torch.Tensor | None


def chunk_logits(call: LinearCall, chunk: Chunk, cols: slice = slice(None)) -> None:
    """Columns ``cols`` of the chunk's logits: z = f(hs W_S^T + b_S) in the first n rows,
    u = f(ht W_T^T + b_T) in the last n; one GEMM when the head is shared."""
    n, logits = chunk.hs.shape[0], chunk.logits
    if chunk.stacked is not None:
        head_logits(logits[:, cols], call.student_head, [chunk.stacked], cols)
    else:
        head_logits(logits[:n, cols], call.student_head, [chunk.hs], cols)
        head_logits(logits[n:, cols], call.teacher_head, [chunk.ht], cols)


def tiled_sweep(call: LinearCall, acc: Accumulators, chunk: Chunk | None,
                pending: Pending | None) -> None:
    """One sweep over the vocabulary in tiles of ``call.vocab_tile`` head rows: the head
    products of the ``pending`` chunk's gradient, then the logits of ``chunk`` (or None),
    tile by tile, so that each head tile is read from memory once for both. The logits may
    overwrite any rows of the pending gradient: a tile's columns of the gradient are used
    before the same columns of the logits are written. The tiles are shared out over the
    worker threads of ``tiles.run_shares``; each has its own partial d h when there are
    several, added after the sweep in worker order."""
    tiles = tile_ranges(call.student_head.weight.shape[0], call.vocab_tile)
    solo = len(shares(tiles)) == 1
    rows = None
    if pending is not None and acc.hidden is not None:
        rows = acc.hidden[pending.r0:pending.r0 + pending.grad.shape[0]]

    def sweep(share):
        part = rows if solo or rows is None else torch.zeros_like(rows)
        for v0, v1 in share:
            if pending is not None:
                acc.add_tile(call, pending, v0, v1, part)
            if chunk is not None:
                chunk_logits(call, chunk, slice(v0, v1))
        return part

    parts = run_shares(sweep, tiles)
    if rows is not None and not solo:
        for part in parts:
            rows.add_(part)
    if pending is not None:  # every tile's d W products are in: later ones add to them
        acc.weight_beta = 1.0


def hand_over(call: LinearCall, acc: Accumulators, grad, hs, r0: int,
              tiled: bool) -> Pending | None:
    """A chunk's gradient to its head products: made now (whole-head schedule), or returned
    as the ``Pending`` chunk of the next tiled sweep."""
    if tiled:
        return Pending(grad, hs.float(), r0)
    acc.add(call, grad, hs, r0)
    return None


def run_chunks(call: LinearCall, index: torch.Tensor, stats: torch.Tensor,
               scales: co.RowScales, b_lab, c, *, with_stats: bool,
               acc: Accumulators | None) -> None:
    """One pass over the chunks of the rows ``index``: the logits by GEMM, then
    (``with_stats``) the row stats into ``stats`` (6, len(index)), and (``acc``) the chunk's
    gradient into the accumulators. ``scales``, ``b_lab`` are those of the same rows.

    Whole-head schedule (``call.vocab_tile`` None): each chunk's logits by one GEMM per head,
    its gradient's products with the head right after. Tiled schedule: the head products of
    chunk i's gradient are made in the same sweep over head tiles as the logits of chunk
    i + 1 (which take its place tile by tile), so a head tile is read from memory once per
    chunk instead of two or three times."""
    cfg, V = call.config, call.student_head.weight.shape[0]
    tiled = call.vocab_tile is not None and acc is not None
    widest = V if call.shards is None else call.shards.layout.widest
    itemsize = call.student_head.weight.element_size()
    chunk_bytes = call.chunk_bytes
    if acc is not None and acc.weight is not None and not tiled:
        chunk_bytes = max(chunk_bytes, min(2 * WEIGHT_CHUNK_ROWS * widest * itemsize,
                                           acc.weight.numel() * acc.weight.element_size()))
    ranges = chunk_ranges(index.shape[0], 2, widest, itemsize, chunk_bytes)
    if not ranges:
        return
    buf = torch.empty((2 * ranges[0][1], V), dtype=call.student_head.weight.dtype,
                      device=index.device)
    labels = row_labels(call, index)
    kept = call.labels[index] != cfg.ignore_index
    pending = None
    for r0, r1 in ranges:
        idx, y, n = index[r0:r1], labels[r0:r1], r1 - r0
        hs = call.student_rows.index_select(0, idx)
        ht = call.teacher_rows.index_select(0, idx)
        chunk = Chunk(buf[:2 * n], hs, ht, torch.cat([hs, ht]) if call.shared else None)
        if tiled:
            tiled_sweep(call, acc, chunk, pending)
        else:
            chunk_logits(call, chunk)
        z, u = chunk.logits[:n], chunk.logits[n:]
        if with_stats:
            st = chunk_stats(call, z, u, y)
            stats[:, r0:r1] = torch.stack(st).view(N_STATS, -1)
        if acc is None:
            continue
        st = RowStats(*stats[:, r0:r1])
        part = co.RowScales(*(s[r0:r1] for s in scales))
        if cfg.importance_clip is not None:
            part = co.with_ratio(part, st.student_label, call.old_logprobs[idx], cfg)
        rows = co.row_coefficients(st.divergence, st.student_label, st.teacher_label,
                                   None if b_lab is None else b_lab[r0:r1],
                                   kept[r0:r1], c, part, cfg)
        pending = hand_over(call, acc, chunk_grad(call, z, u, y, st, rows), hs, r0, tiled)
    if pending is not None:
        tiled_sweep(call, acc, None, pending)


def scatter_rows(values: torch.Tensor, index: torch.Tensor, N: int, dim: int = -1):
    """Values of the rows ``index`` (along ``dim``) placed into zeros of size N there."""
    shape = list(values.shape)
    shape[dim] = N
    return values.new_zeros(shape).index_copy_(dim, index, values)


def linear_loss(call: LinearCall, shape, view_rows, view_lp, negative_rows, negative_lp,
                student_hidden, teacher_hidden, num_items_in_batch,
                view_mask=None) -> LinearResult:
    """The whole fused-linear loss. ``shape`` = (B, T); ``view_rows`` a list of K (N, Ht)
    tensors or None (then ``view_lp`` (K, B, T)); likewise the negative. ``view_mask``
    (B, T): the positions the views scored (None: all); only those view rows meet a head.

    Only the rows whose label is not ignored are multiplied by a head (an ignored row has
    zero loss and gradient), except on ``ALL_ROWS_DEVICES`` (CUDA), where every row is, so
    that no host sync counts the kept rows (with ``view_mask``, the views' rows still are
    counted). Views and negative are scored first, so that every per-row
    coefficient is known in the one pass over the student/teacher chunks; only
    ``clip_quantile`` adds a stats pass before it."""
    cfg = call.config
    N = call.labels.shape[0]
    mask = call.labels != cfg.ignore_index
    index, view_lp, negative_lp, scales, b_lab = scored_rows(
        call, shape, view_rows, view_lp, negative_rows, negative_lp, num_items_in_batch,
        view_mask)
    stats = torch.zeros(N_STATS, index.shape[0], dtype=torch.float32, device=index.device)
    acc = Accumulators(call, index.shape[0]) if any(call.grads) else None
    if cfg.clip_quantile is not None and acc is not None:
        run_chunks(call, index, stats, scales, b_lab, None, with_stats=True, acc=None)
        c = co.clip_threshold(stats[2], call.labels[index] != cfg.ignore_index, cfg)
        run_chunks(call, index, stats, scales, b_lab, c, with_stats=False, acc=acc)
    else:
        c = None if cfg.clip_quantile is not None else co.clip_threshold(stats[2], None, cfg)
        run_chunks(call, index, stats, scales, b_lab, c, with_stats=True, acc=acc)

    all_rows = RowStats(*scatter_rows(stats, index, N).view(N_STATS, *shape))
    terms = combine(all_rows, mask.view(shape), cfg, view_lp, negative_lp, student_hidden,
                    teacher_hidden, num_items_in_batch, view_mask, old_rows(call, shape))
    return linear_result(call, terms, acc, index, student_hidden)


def old_rows(call: LinearCall, shape):
    """The rollout's label log-probs of ``importance_clip`` as (B, T), or None."""
    return None if call.old_logprobs is None else call.old_logprobs.view(shape)


def scored_rows(call: LinearCall, shape, view_rows, view_lp, negative_rows, negative_lp,
                num_items_in_batch, view_mask=None):
    """What the chunk pass needs before it starts: the rows that meet the head ``index`` (the
    kept ones, or all on ``ALL_ROWS_DEVICES``), the views' and
    negative's label log-probs (scored through the teacher head where not given; the views
    only where ``view_mask``, None: everywhere), the kept rows' ``RowScales`` and negative
    label log-probs (None without contrastive term)."""
    cfg = call.config
    N = call.labels.shape[0]
    mask = call.labels != cfg.ignore_index
    if mask.device.type in ALL_ROWS_DEVICES:
        index = torch.arange(N, device=mask.device)
    else:
        index = mask.nonzero().squeeze(1)
    view_index = index if view_mask is None else (mask & view_mask.reshape(N)).nonzero()[:, 0]
    jobs = []  # (rows, groups): views and negative in one sweep when they share their rows
    if cfg.agreement != "none" and view_lp is None:
        jobs.append((view_index, [(view_rows, cfg.view_temperature)]))
    if cfg.contrastive_weight > 0 and negative_lp is None:
        negative = ([negative_rows], cfg.temperature)
        if jobs and view_mask is None:
            jobs[0][1].append(negative)
        else:
            jobs.append((index, [negative]))
    scored = [scatter_rows(x, rows, N) for rows, groups in jobs
              for x in score_rows(call, rows, groups)]
    if cfg.agreement != "none" and view_lp is None:
        view_lp = scored.pop(0).view(-1, *shape)
    if cfg.contrastive_weight > 0 and negative_lp is None:
        negative_lp = scored.pop(0).view(shape)
    scales = co.RowScales(*(s.reshape(-1)[index] for s in co.row_scales(
        mask.view(shape), cfg, view_lp, num_items_in_batch, view_mask)))
    b_lab = negative_lp.reshape(-1)[index].float() if cfg.contrastive_weight > 0 else None
    return index, view_lp, negative_lp, scales, b_lab


def linear_result(call: LinearCall, terms: Coefficients, acc: Accumulators | None, index,
                  student_hidden) -> LinearResult:
    """The terms with the accumulated gradients (d hidden of the kept rows ``index``
    scattered to all rows, plus the feature term's) cast to their inputs' dtypes."""
    N = call.labels.shape[0]
    if acc is None:
        return LinearResult(terms, None, None, None)
    grad_h = None
    if acc.hidden is not None:
        if call.shards is not None:
            call.shards.sum_(acc.hidden)
        grad_h = scatter_rows(acc.hidden, index, N, dim=0).view(student_hidden.shape)
        if terms.hidden_grad is not None:
            grad_h.add_(terms.hidden_grad)
        grad_h = grad_h.to(student_hidden.dtype)
    w = call.student_head
    grad_w = None if acc.weight is None else acc.weight.to(w.weight.dtype)
    grad_b = None if acc.bias is None else acc.bias.to(w.bias.dtype)
    return LinearResult(terms, grad_h, grad_w, grad_b)
