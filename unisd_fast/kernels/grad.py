"""Gradient pass: a second read of student and teacher, one write of d logits."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    DIVERGENCE_CODE,
    FKL,
    RKL,
    launch_geometry,
    row_offset,
    strides_bt,
    to_bf16_rne,
)


# dz_v = ( CK * g_div_v + CC * (1[v == y] - p_S,v) ) / tau, with per-row constants CK (kd
# weight x agreement weight x not-clipped / normaliser x grad_output) and CC (contrastive
# weight x hinge sign / normaliser x grad_output), and
#   fkl: g_div = p_S - p_T
#   rkl: g_div = p_S (log p_S - log p_T - D)
#   jsd: g_div = (1-a) p_S (log p_S - log M - AUX),  AUX = KL(p_S||M)
# Rows with CK = CC = 0 (ignored, clipped without hinge) write zeros and read nothing.
# G may alias Z (in-place backward): each tile is read before it is written.
@triton.jit
def _grad_kernel(
    z_ptr, u_ptr, y_ptr, g_ptr,
    lse_s_ptr, lse_t_ptr, d_ptr, aux_ptr, ck_ptr, cc_ptr,
    T, V, z_sb, z_st, u_sb, u_st, y_sb, y_st, g_sb, g_st,
    inv_tau, alpha,
    DIV: tl.constexpr, BF16_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ck = tl.load(ck_ptr + row)
    cc = tl.load(cc_ptr + row)
    g_row = g_ptr + row_offset(row, T, g_sb, g_st)
    if (ck == 0.0) & (cc == 0.0):
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(g_row + cols, tl.zeros((BLOCK,), tl.float32).to(g_ptr.dtype.element_ty),
                     mask=cols < V)
    else:
        y = tl.load(y_ptr + row_offset(row, T, y_sb, y_st)).to(tl.int64)
        z_row = z_ptr + row_offset(row, T, z_sb, z_st)
        u_row = u_ptr + row_offset(row, T, u_sb, u_st)
        lse_s = tl.load(lse_s_ptr + row)
        lse_t = tl.load(lse_t_ptr + row)
        d = tl.load(d_ptr + row)
        aux = tl.load(aux_ptr + row)
        log_a = tl.log(alpha)
        log_1ma = tl.log(1.0 - alpha)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < V
            lp_s = tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_tau - lse_s
            lp_t = tl.load(u_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_tau - lse_t
            p_s = tl.exp(lp_s)
            if DIV == FKL:
                g_div = p_s - tl.exp(lp_t)
            elif DIV == RKL:
                g_div = p_s * (lp_s - lp_t - d)
            else:
                x1 = lp_s + log_1ma
                x2 = lp_t + log_a
                mx = tl.maximum(x1, x2)
                log_m = mx + tl.log(tl.exp(x1 - mx) + tl.exp(x2 - mx))
                g_div = (1.0 - alpha) * p_s * (lp_s - log_m - aux)
            onehot = tl.where(cols == y, 1.0, 0.0)
            g = (ck * g_div + cc * (onehot - p_s)) * inv_tau
            if BF16_OUT:
                g = to_bf16_rne(g)
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=valid)


def write_grad(z, u, labels, out, stats, ck, cc, *, divergence: str, tau: float, alpha: float):
    """Write d loss / d z into ``out`` (may be ``z`` itself) from row stats and coefficients."""
    B, T, V = z.shape
    lse_s, lse_t, d, aux = (t.contiguous() for t in stats[:4])
    block, warps = launch_geometry(V)
    _grad_kernel[(B * T,)](
        z, u, labels, out, lse_s, lse_t, d, aux, ck.contiguous(), cc.contiguous(),
        T, V, *strides_bt(z), *strides_bt(u), *strides_bt(labels), *strides_bt(out),
        1.0 / tau, alpha,
        DIV=DIVERGENCE_CODE[divergence], BF16_OUT=out.dtype == torch.bfloat16, BLOCK=block,
        num_warps=warps,
    )
