"""Stats pass: one read of each student/teacher row gives every per-row statistic.

Also the label log-prob kernel that reads each view / negative row once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import RowStats
from .common import DIVERGENCE_CODE, FKL, RKL, launch_geometry, row_offset, strides_bt


# With s = z / tau and t = u / tau, online over vocabulary tiles:
#   lse_S = m_S + log sum e^(s - m_S), lse_T likewise (running max, rescaled sums);
#   fkl: D = sum e^(t - m_T)(t - s) / l_T - lse_T + lse_S   (accumulator rescaled with m_T)
#   rkl: D = sum e^(s - m_S)(s - t) / l_S - lse_S + lse_T   (accumulator rescaled with m_S)
#   jsd: needs lse first, so a second loop over the row: log M = logaddexp(log(1-a) + log p_S,
#        log a + log p_T), D = a KL(p_T||M) + (1-a) KL(p_S||M); AUX = KL(p_S||M).
#   label log-probs: s_y - lse_S and t_y - lse_T.
# Rows whose label is ignore_index write zeros and read nothing.
@triton.jit
def _stats_kernel(
    z_ptr, u_ptr, y_ptr,
    lse_s_ptr, lse_t_ptr, d_ptr, aux_ptr, s_lab_ptr, t_lab_ptr,
    T, V, z_sb, z_st, u_sb, u_st, y_sb, y_st,
    inv_tau, alpha, ignore_index,
    DIV: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row_offset(row, T, y_sb, y_st)).to(tl.int64)
    zero = tl.zeros((), tl.float32)
    lse_s = zero
    lse_t = zero
    d = zero
    aux = zero
    s_lab = zero
    t_lab = zero
    if y != ignore_index:
        z_row = z_ptr + row_offset(row, T, z_sb, z_st)
        u_row = u_ptr + row_offset(row, T, u_sb, u_st)
        m_s = float("-inf")
        m_t = float("-inf")
        l_s = 0.0
        l_t = 0.0
        acc = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < V
            s = tl.load(z_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_tau
            t = tl.load(u_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_tau
            new_m_s = tl.maximum(m_s, tl.max(s, 0))
            new_m_t = tl.maximum(m_t, tl.max(t, 0))
            e_s = tl.exp(s - new_m_s)
            e_t = tl.exp(t - new_m_t)
            scale_s = tl.exp(m_s - new_m_s)
            scale_t = tl.exp(m_t - new_m_t)
            l_s = l_s * scale_s + tl.sum(e_s, 0)
            l_t = l_t * scale_t + tl.sum(e_t, 0)
            if DIV == FKL:
                acc = acc * scale_t + tl.sum(tl.where(valid, e_t * (t - s), 0.0), 0)
            elif DIV == RKL:
                acc = acc * scale_s + tl.sum(tl.where(valid, e_s * (s - t), 0.0), 0)
            m_s = new_m_s
            m_t = new_m_t
        lse_s = m_s + tl.log(l_s)
        lse_t = m_t + tl.log(l_t)
        if DIV == FKL:
            d = acc / l_t - lse_t + lse_s
        elif DIV == RKL:
            d = acc / l_s - lse_s + lse_t
        else:
            log_a = tl.log(alpha)
            log_1ma = tl.log(1.0 - alpha)
            kl_tm = 0.0
            kl_sm = 0.0
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                valid = cols < V
                s = tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_tau
                t = tl.load(u_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_tau
                lp_s = s - lse_s
                lp_t = t - lse_t
                x1 = lp_s + log_1ma
                x2 = lp_t + log_a
                mx = tl.maximum(x1, x2)
                log_m = mx + tl.log(tl.exp(x1 - mx) + tl.exp(x2 - mx))
                kl_tm += tl.sum(tl.where(valid, tl.exp(lp_t) * (lp_t - log_m), 0.0), 0)
                kl_sm += tl.sum(tl.where(valid, tl.exp(lp_s) * (lp_s - log_m), 0.0), 0)
            d = alpha * kl_tm + (1.0 - alpha) * kl_sm
            aux = kl_sm
        s_lab = tl.load(z_row + y).to(tl.float32) * inv_tau - lse_s
        t_lab = tl.load(u_row + y).to(tl.float32) * inv_tau - lse_t
    tl.store(lse_s_ptr + row, lse_s)
    tl.store(lse_t_ptr + row, lse_t)
    tl.store(d_ptr + row, d)
    tl.store(aux_ptr + row, aux)
    tl.store(s_lab_ptr + row, s_lab)
    tl.store(t_lab_ptr + row, t_lab)


# l = x_y / tau - logsumexp(x / tau), online max/sum over vocabulary tiles; 0 on ignored rows.
@triton.jit
def _label_logprob_kernel(
    x_ptr, y_ptr, out_ptr, T, V, x_sb, x_st, y_sb, y_st, inv_tau, ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row_offset(row, T, y_sb, y_st)).to(tl.int64)
    out = tl.zeros((), tl.float32)
    if y != ignore_index:
        x_row = x_ptr + row_offset(row, T, x_sb, x_st)
        m = float("-inf")
        acc = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            x = x * inv_tau
            new_m = tl.maximum(m, tl.max(x, 0))
            acc = acc * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
            m = new_m
        out = tl.load(x_row + y).to(tl.float32) * inv_tau - (m + tl.log(acc))
    tl.store(out_ptr + row, out)


def row_stats(z, u, labels, *, divergence: str, tau: float, alpha: float, ignore_index: int):
    """Per-row (lse_S, lse_T, D, aux, s_y, t_y), each a float32 (B, T) tensor."""
    B, T, V = z.shape
    outs = [torch.empty((B, T), dtype=torch.float32, device=z.device) for _ in range(6)]
    block, warps = launch_geometry(V)
    _stats_kernel[(B * T,)](
        z, u, labels, *outs, T, V, *strides_bt(z), *strides_bt(u), *strides_bt(labels),
        1.0 / tau, alpha, ignore_index,
        DIV=DIVERGENCE_CODE[divergence], BLOCK=block, num_warps=warps,
    )
    return RowStats(*outs)


def label_logprob(x, labels, *, tau: float, ignore_index: int):
    """log softmax(x / tau)[labels] per row as float32 (B, T); 0 on ignored rows."""
    B, T, V = x.shape
    out = torch.empty((B, T), dtype=torch.float32, device=x.device)
    block, warps = launch_geometry(V)
    _label_logprob_kernel[(B * T,)](
        x, labels, out, T, V, *strides_bt(x), *strides_bt(labels), 1.0 / tau, ignore_index,
        BLOCK=block, num_warps=warps,
    )
    return out

