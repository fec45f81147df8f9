"""Gradient pass: a second read of student and teacher, one write of d logits."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    DIVERGENCE_CODE,
    FKL,
    LN2,
    LOG2E,
    RKL,
    SERIES_BOUND,
    approx_log2,
    expm1_minus_x_short,
    launch_geometry,
    mix_remainder_coefficients,
    mix_remainder_series,
    row_offset,
    strides_bt,
    to_bf16_rne,
)


# dz_v = ( CK * G_v + CC * (1[v == y] - p_S,v) ) / tau, with per-row constants CK (kd
# weight x agreement weight x not-clipped / normaliser x grad_output) and CC (contrastive
# weight x hinge sign / normaliser x grad_output), and, with r = lp_T - lp_S formed as
# (u - z) / tau + GAP (GAP = lse_S - lse_T from the stats pass, no cancellation):
#   fkl: G = p_S - p_T = p_T expm1(-r)   (series for |r| < SERIES_BOUND, p_S - p_T beyond)
#   rkl: G = p_S (-r - D)
#   jsd: G = (1-a) p_S (-log((1-a) + a e^r) - AUX),  AUX = KL(p_S||M)  (the log: a r + q(r)
#        by the series of common.mix_remainder_series below SERIES_BOUND)
# p = 2^(x log2(e) / tau - lse log2(e)): one FMA and one MUFU.EX2. Columns where z and u are
# both -inf get 0 (r is NaN there: the fkl select takes p_S - p_T = 0, rkl and jsd have
# p_S = 0); a one-sided -inf column has r = +-inf, which the same forms handle.
# The loop writes CK G / tau - CC p_S / tau on full tiles without masks; the label column is
# rewritten once after a barrier with + CC / tau (its logits read before the loop, so that
# G may alias Z: in-place backward, each tile is read before it is written).
# Rows with CK = CC = 0 (ignored, clipped without hinge) write zeros and read nothing.
# Grid: (rows, column chunks); program (row, c) writes columns [c * COLS, (c + 1) * COLS).
@triton.jit
def _grad_values(zf, uf, inv_tau, scale2, ls2, lt2, gap, d, aux, alpha,
                 c2, c3, c4, c5, c6, c7, c8, ck2, cc2, DIV: tl.constexpr):
    p_s = tl.exp2(zf * scale2 - ls2)
    r = (uf - zf) * inv_tau + gap
    if DIV == FKL:
        p_t = tl.exp2(uf * scale2 - lt2)
        e = -r
        series, _ = expm1_minus_x_short(e)
        g_div = tl.where(tl.abs(r) < SERIES_BOUND, p_t * (e + series), p_s - p_t)
    elif DIV == RKL:
        g_div = tl.where(p_s == 0.0, 0.0, p_s * (-r - d))
    else:
        lms = tl.where(tl.abs(r) < SERIES_BOUND,
                       alpha * r + mix_remainder_series(r, c2, c3, c4, c5, c6, c7, c8),
                       approx_log2((1.0 - alpha) + alpha * tl.exp2(r * LOG2E)) * LN2)
        g_div = tl.where(p_s == 0.0, 0.0, (1.0 - alpha) * p_s * (-lms - aux))
    return ck2 * g_div - cc2 * p_s


@triton.jit
def _store_grad(ptrs, g, mask, BF16_OUT: tl.constexpr):
    if BF16_OUT:
        g = to_bf16_rne(g)
    tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _grad_kernel(
    z_ptr, u_ptr, y_ptr, g_ptr,
    lse_s_ptr, lse_t_ptr, gap_ptr, d_ptr, aux_ptr, ck_ptr, cc_ptr,
    T, V, COLS, z_sb, z_st, u_sb, u_st, y_sb, y_st, g_sb, g_st,
    inv_tau, alpha,
    DIV: tl.constexpr, BF16_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * COLS
    last = tl.minimum(first + COLS, V)
    ck = tl.load(ck_ptr + row)
    cc = tl.load(cc_ptr + row)
    g_row = g_ptr + row_offset(row, T, g_sb, g_st)
    if (ck == 0.0) & (cc == 0.0):
        for start in range(first, last, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(g_row + cols, tl.zeros((BLOCK,), tl.float32).to(g_ptr.dtype.element_ty),
                     mask=cols < last)
    else:
        y = tl.load(y_ptr + row_offset(row, T, y_sb, y_st)).to(tl.int64)
        z_row = z_ptr + row_offset(row, T, z_sb, z_st)
        u_row = u_ptr + row_offset(row, T, u_sb, u_st)
        z_y = tl.load(z_row + y).to(tl.float32)
        u_y = tl.load(u_row + y).to(tl.float32)
        scale2 = inv_tau * LOG2E
        ls2 = tl.load(lse_s_ptr + row) * LOG2E
        lt2 = tl.load(lse_t_ptr + row) * LOG2E
        gap = tl.load(gap_ptr + row)
        d = tl.load(d_ptr + row)
        aux = tl.load(aux_ptr + row)
        c2, c3, c4, c5, c6, c7, c8 = mix_remainder_coefficients(alpha)
        ck2 = ck * inv_tau
        cc2 = cc * inv_tau
        full = (last - first) // BLOCK
        for i in range(0, full):
            cols = first + i * BLOCK + tl.arange(0, BLOCK)
            zf = tl.load(z_row + cols).to(tl.float32)
            uf = tl.load(u_row + cols).to(tl.float32)
            g = _grad_values(zf, uf, inv_tau, scale2, ls2, lt2, gap, d, aux, alpha,
                             c2, c3, c4, c5, c6, c7, c8, ck2, cc2, DIV)
            _store_grad(g_row + cols, g, None, BF16_OUT)
        cols = first + full * BLOCK + tl.arange(0, BLOCK)
        if first + full * BLOCK < last:
            keep = cols < last
            zf = tl.load(z_row + cols, mask=keep, other=float("-inf")).to(tl.float32)
            uf = tl.load(u_row + cols, mask=keep, other=float("-inf")).to(tl.float32)
            g = _grad_values(zf, uf, inv_tau, scale2, ls2, lt2, gap, d, aux, alpha,
                             c2, c3, c4, c5, c6, c7, c8, ck2, cc2, DIV)
            _store_grad(g_row + cols, g, keep, BF16_OUT)
        if (y >= first) & (y < last):
            tl.debug_barrier()
            g = _grad_values(z_y, u_y, inv_tau, scale2, ls2, lt2, gap, d, aux, alpha,
                             c2, c3, c4, c5, c6, c7, c8, ck2, cc2, DIV) + cc2
            _store_grad(g_row + y, g, None, BF16_OUT)


def column_chunks(rows: int, vocab: int, block: int, target_programs: int) -> int:
    """Columns per program of the gradient grid: the whole row (a 1-D grid) when there are
    at least ``target_programs`` rows, else rows are split into vocabulary chunks (whole
    tiles) until about ``target_programs`` programs run (docs/kernels.md)."""
    tiles = triton.cdiv(vocab, block)
    chunks = min(tiles, max(1, triton.cdiv(target_programs, rows)))
    return triton.cdiv(tiles, chunks) * block


def write_grad(z, u, labels, out, stats, ck, cc, *, divergence: str, tau: float, alpha: float,
               max_block: int, target_programs: int):
    """Write d loss / d z into ``out`` (may be ``z`` itself) from row stats and coefficients."""
    B, T, V = z.shape
    rows = (stats.lse_s, stats.lse_t, stats.lse_gap, stats.divergence, stats.aux)
    block, warps = launch_geometry(V, max_block)
    cols = column_chunks(B * T, V, block, target_programs)
    _grad_kernel[(B * T, triton.cdiv(V, cols))](
        z, u, labels, out, *(t.contiguous() for t in rows), ck.contiguous(), cc.contiguous(),
        T, V, cols, *strides_bt(z), *strides_bt(u), *strides_bt(labels), *strides_bt(out),
        1.0 / tau, alpha,
        DIV=DIVERGENCE_CODE[divergence], BF16_OUT=out.dtype == torch.bfloat16, BLOCK=block,
        num_warps=warps,
    )
