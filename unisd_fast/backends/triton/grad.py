"""Gradient pass: a second read of student and teacher, one write of d logits."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    DIVERGENCE_CODE,
    FKL,
    RKL,
    expm1_minus_x_series,
    launch_geometry,
    mix_log_terms,
    row_offset,
    strides_bt,
    to_bf16_rne,
)


# dz_v = ( CK * G_v + CC * (1[v == y] - p_S,v) ) / tau, with per-row constants CK (kd
# weight x agreement weight x not-clipped / normaliser x grad_output) and CC (contrastive
# weight x hinge sign / normaliser x grad_output), and, with r = lp_T - lp_S formed as
# (u - z) / tau + GAP (GAP = lse_S - lse_T from the stats pass, no cancellation):
#   fkl: G = p_S - p_T = p_T expm1(-r)   (series for |r| < 0.5, p_S - p_T beyond)
#   rkl: G = p_S (-r - D)
#   jsd: G = (1-a) p_S (-log1p(a expm1(r)) - AUX),  AUX = KL(p_S||M)
# Columns where z and u are both -inf get 0; a one-sided -inf column uses r = lp_T - lp_S.
# Rows with CK = CC = 0 (ignored, clipped without hinge) write zeros and read nothing.
# Grid: (rows, column chunks); program (row, c) writes columns [c * COLS, (c + 1) * COLS).
# G may alias Z (in-place backward): each tile is read before it is written.
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
        lse_s = tl.load(lse_s_ptr + row)
        lse_t = tl.load(lse_t_ptr + row)
        gap = tl.load(gap_ptr + row)
        d = tl.load(d_ptr + row)
        aux = tl.load(aux_ptr + row)
        log_a = tl.log(alpha)
        log_1ma = tl.log(1.0 - alpha)
        for start in range(first, last, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < last
            zf = tl.load(z_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
            uf = tl.load(u_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
            lp_s = zf * inv_tau - lse_s
            lp_t = uf * inv_tau - lse_t
            z_inf = zf == float("-inf")
            u_inf = uf == float("-inf")
            r = tl.where(z_inf | u_inf, 0.0, (uf - zf) * inv_tau) + gap
            r = tl.where(z_inf != u_inf, lp_t - lp_s, r)
            p_s = tl.exp(lp_s)
            if DIV == FKL:
                p_t = tl.exp(lp_t)
                near = tl.abs(r) < 0.5
                e = tl.where(near, -r, 0.0)
                g_div = tl.where(near, p_t * (e + expm1_minus_x_series(e)), p_s - p_t)
            elif DIV == RKL:
                g_div = tl.where(p_s == 0.0, 0.0, p_s * (-r - d))
            else:
                lms, _ = mix_log_terms(r, alpha, log_a, log_1ma)
                g_div = tl.where(p_s == 0.0, 0.0, (1.0 - alpha) * p_s * (-lms - aux))
            onehot = tl.where(cols == y, 1.0, 0.0)
            g = (ck * g_div + cc * (onehot - p_s)) * inv_tau
            if BF16_OUT:
                g = to_bf16_rne(g)
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=valid)


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
