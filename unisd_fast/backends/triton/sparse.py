"""The support passes of the Triton backend (docs/losses.md, "Sparse supports"): per row,
the log-sum-exps of z / tau (and u / tau) and the top-k candidates of each vocabulary tile,
merged on the device; and the dense gradient write. The N x k work (log-probs at the
support, the divergence and its coefficients) is torch on the support."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..support import SupportRows
from .common import launch_geometry, row_offset, strides_bt

LOW_BITS = (1 << 32) - 1
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
EMPTY_KEY = -(1 << 63)


# Keys ordering columns by value, then by lower column: the float32 bit pattern made
# monotone (negative floats have their 31 low bits flipped; -0 is read as +0) times 2^32,
# plus 2^32 - 1 - column; columns past V get the least key.
@triton.jit
def _keys(x, cols, V):
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    keys = bits * 4294967296 + (4294967295 - cols.to(tl.int64))
    return tl.where(cols < V, keys, -9223372036854775807 - 1)


# One tile of the running (maximum, sum) per column, base 2: m' = max(m, x),
# s' = s 2^(m - m') + 2^(x - m') (m starts at -FLT_MAX, so a -inf column adds 0).
@triton.jit
def _online(x, m, s):
    m_new = tl.maximum(m, x)
    return m_new, s * tl.exp2(m - m_new) + tl.exp2(x - m_new)


# One row: over tiles of BLOCK columns, the running maximum m and sum s of 2^(x log2(e) /
# tau - m) per tile column (s rescaled by 2^(m_old - m_new) as m grows), reduced at the end
# to lse = (M + log2 sum_j s_j 2^(m_j - M)) ln 2, for z and, with TEACHER, for u. With TOPK,
# each tile's keys sorted in descending order and the first KEEP stored as the tile's
# candidates (the tile's top KEEP; the row's top-k is among the tiles' candidates). Rows of
# ignored labels store lse 0 and no candidates (the buffer's least keys).
@triton.jit
def _support_kernel(z_ptr, u_ptr, y_ptr, lse_s_ptr, lse_t_ptr, cand_ptr, T, V, z_sb, z_st,
                    u_sb, u_st, y_sb, y_st, inv_tau, ignore_index, n_tiles,
                    BLOCK: tl.constexpr, KEEP: tl.constexpr, TEACHER: tl.constexpr,
                    TOPK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row_offset(row, T, y_sb, y_st)).to(tl.int64)
    lse_s = tl.zeros((), tl.float32)
    lse_t = tl.zeros((), tl.float32)
    if y != ignore_index:
        z_row = z_ptr + row_offset(row, T, z_sb, z_st)
        u_row = u_ptr + row_offset(row, T, u_sb, u_st)
        scale2 = inv_tau * LOG2E
        m_s = tl.full((BLOCK,), -3.4028234663852886e38, tl.float32)
        s_s = tl.zeros((BLOCK,), tl.float32)
        m_t = tl.full((BLOCK,), -3.4028234663852886e38, tl.float32)
        s_t = tl.zeros((BLOCK,), tl.float32)
        offs = tl.arange(0, BLOCK)
        for i in range(0, n_tiles):
            cols = i * BLOCK + offs
            z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_s, s_s = _online(z * scale2, m_s, s_s)
            if TEACHER:
                ut = tl.load(u_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_t, s_t = _online(ut * scale2, m_t, s_t)
            if TOPK:
                keys = tl.sort(_keys(z, cols, V), descending=True)
                tl.store(cand_ptr + (row * n_tiles + i) * KEEP + offs, keys, mask=offs < KEEP)
        top = tl.max(m_s, 0)
        lse_s = (top + tl.log2(tl.sum(s_s * tl.exp2(m_s - top), 0))) * LN2
        if TEACHER:
            top = tl.max(m_t, 0)
            lse_t = (top + tl.log2(tl.sum(s_t * tl.exp2(m_t - top), 0))) * LN2
    tl.store(lse_s_ptr + row, lse_s)
    tl.store(lse_t_ptr + row, lse_t)


def _flat(x):
    """A (B, T, c) tensor as (N, c) rows (a copy only where its layout needs one)."""
    return x.reshape(-1, x.shape[-1])


def _at(x, index, lse, tau):
    """log softmax(x / tau) at the columns ``index`` (float64)."""
    return (_flat(x).gather(-1, index).float() / tau).double() - lse.double().unsqueeze(-1)


def support_stats(z, u, labels, index, *, k: int, tau: float, ignore_index: int,
                  max_block: int) -> SupportRows:
    """The support pass over (B, T, V) logits: ``_support_kernel``, then the top-k of the
    tiles' candidates (their keys' top-k: ties to the lower column) unless ``index`` (B, T,
    k) is given, and the log-probs at the support and the labels."""
    B, T, V = z.shape
    N = B * T
    block, warps = launch_geometry(V, max_block)
    n_tiles = triton.cdiv(V, block)
    keep_per_tile = min(k, block)
    topk = index is None
    cand = torch.full((N, n_tiles * keep_per_tile) if topk else (1,), EMPTY_KEY,
                      dtype=torch.int64, device=z.device)
    lse_s = torch.empty(N, dtype=torch.float32, device=z.device)
    lse_t = torch.empty_like(lse_s)
    teacher = u if u is not None else z
    _support_kernel[(N,)](
        z, teacher, labels, lse_s, lse_t, cand, T, V, *strides_bt(z), *strides_bt(teacher),
        *strides_bt(labels), 1.0 / tau, ignore_index, n_tiles, BLOCK=block,
        KEEP=keep_per_tile, TEACHER=u is not None, TOPK=topk, num_warps=warps)
    keep = (labels != ignore_index).reshape(N)
    row = keep.unsqueeze(-1)
    if topk:
        index = LOW_BITS - (cand.topk(k, dim=-1).values & LOW_BITS)
    index = torch.where(row, _flat(index).long(), torch.arange(k, device=z.device))
    y = torch.where(keep, labels.reshape(N), 0).long().unsqueeze(-1)
    lp_s = torch.where(row, _at(z, index, lse_s, tau), 0.0)
    s_lab = torch.where(keep, _at(z, y, lse_s, tau).squeeze(-1), 0.0).float()
    lp_t, t_lab = None, torch.zeros_like(s_lab)
    if u is not None:
        lp_t = torch.where(row, _at(u, index, lse_t, tau), 0.0)
        t_lab = torch.where(keep, _at(u, y, lse_t, tau).squeeze(-1), 0.0).float()
    return SupportRows(torch.where(keep, lse_s.double(), 0.0), index, lp_s, lp_t, s_lab, t_lab)


# The dense part of the gradient of a sparse support: out = -beta exp(z / tau - lse_S) / tau
# (0 on rows with beta = 0), one read of z and one write per column.
@triton.jit
def _support_grad_kernel(z_ptr, out_ptr, lse_ptr, beta_ptr, T, V, z_sb, z_st, o_sb, o_st,
                         inv_tau, n_tiles, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row_offset(row, T, z_sb, z_st)
    o_row = out_ptr + row_offset(row, T, o_sb, o_st)
    beta = tl.load(beta_ptr + row)
    lse2 = tl.load(lse_ptr + row) * LOG2E
    scale2 = inv_tau * LOG2E
    offs = tl.arange(0, BLOCK)
    for i in range(0, n_tiles):
        cols = i * BLOCK + offs
        if beta != 0.0:
            z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = -beta * inv_tau * tl.exp2(z * scale2 - lse2)
        else:
            g = tl.zeros((BLOCK,), tl.float32)
        tl.store(o_row + cols, g.to(out_ptr.dtype.element_ty), mask=cols < V)


def support_grad(z, out, rows: SupportRows, beta, coef, labels, cc, *, tau: float,
                 max_block: int) -> None:
    """Write the gradient of a sparse support into ``out`` (B, T, V; may be ``z``): the
    dense part by ``_support_grad_kernel``, then the k + 1 scattered entries per row
    (coef / tau at the support, cc / tau at the label)."""
    B, T, V = z.shape
    block, warps = launch_geometry(V, max_block)
    _support_grad_kernel[(B * T,)](
        z, out, rows.lse_s.float(), beta.float().contiguous(), T, V, *strides_bt(z),
        *strides_bt(out), 1.0 / tau, triton.cdiv(V, block), BLOCK=block, num_warps=warps)
    flat = out.view(-1, V) if out.is_contiguous() else None
    target = flat if flat is not None else torch.zeros(B * T, V, dtype=out.dtype,
                                                       device=out.device)
    target.scatter_add_(-1, rows.index, (coef / tau).to(out.dtype))
    y = torch.where(cc != 0, labels.reshape(-1), 0).long().unsqueeze(-1)
    target.scatter_add_(-1, y, (cc / tau).to(out.dtype).unsqueeze(-1))
    if flat is None:
        out.add_(target.view(B, T, V))
