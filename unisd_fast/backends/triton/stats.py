"""Stats pass: one read of each student/teacher row gives every per-row statistic.

Also the label log-prob kernel that reads each view / negative row once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..protocol import RowStats
from .common import (
    DIVERGENCE_CODE,
    FKL,
    RKL,
    expm1_minus_x_series,
    launch_geometry,
    mix_log_terms,
    row_offset,
    safe_base,
    shifted_kl_finish,
    strides_bt,
)


# With s = z / tau, t = u / tau, dx = s - t formed as (z - u) / tau, online over vocabulary
# tiles (docs/losses.md, "Accuracy when the student is close to the teacher"):
#   lse_S = m_S + log sum e^(s - m_S), lse_T likewise (running max, rescaled sums);
#   mu = dx at the label, x = dx - mu; with e_T = e^(t - m_T) (rescaled like l_T):
#   A_T = sum e_T x, G_T = sum e_T (e^x - 1 - x)  ->  a = A_T / l_T, b = G_T / l_T,
#   fkl: D = b + f(a + b) (f(w) = log1p(w) - w), lse_S - lse_T = log1p(a + b) + mu;
#   rkl: the same with e_S and -x: lse_S - lse_T = mu - log1p(a' + b');
#   jsd: both, then a second loop over the row with r = lp_T - lp_S = gap - dx:
#        KL(p_T||M) = (1-a) D_fkl - sum p_T q(-r; 1-a), AUX = KL(p_S||M) = a D_rkl - sum p_S
#        q(r; a), D = a KL(p_T||M) + (1-a) AUX (q: the remainder of common.mix_log_terms).
#   Columns where z and u are both -inf are dropped; rows with a one-sided -inf column, or
#   whose shifted sums overflow, take the textbook sums (C_T = sum e_T (t - s), and so on).
#   label log-probs: s_y - lse_S and t_y - lse_T.
# Rows whose label is ignore_index write zeros and read nothing.
@triton.jit
def _stats_kernel(
    z_ptr, u_ptr, y_ptr,
    lse_s_ptr, lse_t_ptr, d_ptr, aux_ptr, s_lab_ptr, t_lab_ptr, gap_ptr,
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
    gap = zero
    if y != ignore_index:
        z_row = z_ptr + row_offset(row, T, z_sb, z_st)
        u_row = u_ptr + row_offset(row, T, u_sb, u_st)
        z_y = tl.load(z_row + y).to(tl.float32)
        u_y = tl.load(u_row + y).to(tl.float32)
        mu = (z_y - u_y) * inv_tau
        mu = tl.where((mu == mu) & (tl.abs(mu) < float("inf")), mu, 0.0)
        m_s = float("-inf")
        m_t = float("-inf")
        l_s = 0.0
        l_t = 0.0
        a_t = 0.0
        g_t = 0.0
        c_t = 0.0
        a_s = 0.0
        g_s = 0.0
        c_s = 0.0
        one_sided = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < V
            zf = tl.load(z_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
            uf = tl.load(u_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
            s = zf * inv_tau
            t = uf * inv_tau
            z_inf = zf == float("-inf")
            u_inf = uf == float("-inf")
            one = z_inf != u_inf
            dx = tl.where(z_inf | u_inf, 0.0, (zf - uf) * inv_tau)
            x = dx - mu
            small = tl.abs(x) < 0.5
            g_x = expm1_minus_x_series(tl.where(small, x, 0.0))
            g_nx = expm1_minus_x_series(tl.where(small, -x, 0.0))
            new_m_s = tl.maximum(m_s, tl.max(s, 0))
            new_m_t = tl.maximum(m_t, tl.max(t, 0))
            base_s = safe_base(new_m_s)
            base_t = safe_base(new_m_t)
            e_s = tl.exp(s - base_s)
            e_t = tl.exp(t - base_t)
            scale_s = tl.exp(m_s - base_s)
            scale_t = tl.exp(m_t - base_t)
            l_s = l_s * scale_s + tl.sum(e_s, 0)
            l_t = l_t * scale_t + tl.sum(e_t, 0)
            one_sided += tl.sum(tl.where(one, 1.0, 0.0), 0)
            if DIV != RKL:
                big = tl.exp(s - mu - base_t) - e_t - e_t * x
                a_t = a_t * scale_t + tl.sum(e_t * x, 0)
                g_t = g_t * scale_t + tl.sum(tl.where(small, e_t * g_x, big), 0)
                c_t = c_t * scale_t + tl.sum(tl.where(e_t == 0.0, 0.0, e_t * (t - s)), 0)
            if DIV != FKL:
                big = tl.exp(t + mu - base_s) - e_s + e_s * x
                a_s = a_s * scale_s - tl.sum(e_s * x, 0)
                g_s = g_s * scale_s + tl.sum(tl.where(small, e_s * g_nx, big), 0)
                c_s = c_s * scale_s + tl.sum(tl.where(e_s == 0.0, 0.0, e_s * (s - t)), 0)
            m_s = new_m_s
            m_t = new_m_t
        lse_s = m_s + tl.log(l_s)
        lse_t = m_t + tl.log(l_t)
        classic_gap = lse_s - lse_t
        ok = one_sided == 0.0
        if DIV != RKL:
            d_f, lg_t, near_t = shifted_kl_finish(a_t / l_t, g_t / l_t)
            ok = ok & near_t & (tl.abs(d_f) < float("inf"))
            gap = lg_t + mu
        if DIV != FKL:
            d_r, lg_s, near_s = shifted_kl_finish(a_s / l_s, g_s / l_s)
            ok = ok & near_s & (tl.abs(d_r) < float("inf"))
            if DIV == RKL:
                gap = mu - lg_s
        gap = tl.where(ok, gap, classic_gap)
        if DIV == FKL:
            d = tl.where(ok, d_f, c_t / l_t - lse_t + lse_s)
        elif DIV == RKL:
            d = tl.where(ok, d_r, c_s / l_s - lse_s + lse_t)
        else:
            log_a = tl.log(alpha)
            log_1ma = tl.log(1.0 - alpha)
            q_t = 0.0
            q_s = 0.0
            k_t = 0.0
            k_s = 0.0
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                valid = cols < V
                zf = tl.load(z_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
                uf = tl.load(u_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
                lp_s = zf * inv_tau - lse_s
                lp_t = uf * inv_tau - lse_t
                z_inf = zf == float("-inf")
                u_inf = uf == float("-inf")
                r = tl.where(z_inf | u_inf, 0.0, (uf - zf) * inv_tau) + gap
                r = tl.where(z_inf != u_inf, lp_t - lp_s, r)
                p_s = tl.exp(lp_s)
                p_t = tl.exp(lp_t)
                lmt, q1 = mix_log_terms(-r, 1.0 - alpha, log_1ma, log_a)
                lms, q2 = mix_log_terms(r, alpha, log_a, log_1ma)
                q_t += tl.sum(tl.where(p_t == 0.0, 0.0, p_t * q1), 0)
                q_s += tl.sum(tl.where(p_s == 0.0, 0.0, p_s * q2), 0)
                k_t -= tl.sum(tl.where(p_t == 0.0, 0.0, p_t * lmt), 0)
                k_s -= tl.sum(tl.where(p_s == 0.0, 0.0, p_s * lms), 0)
            kl_tm = tl.where(ok, (1.0 - alpha) * d_f - q_t, k_t)
            kl_sm = tl.where(ok, alpha * d_r - q_s, k_s)
            d = alpha * kl_tm + (1.0 - alpha) * kl_sm
            aux = kl_sm
        s_lab = z_y * inv_tau - lse_s
        t_lab = u_y * inv_tau - lse_t
    tl.store(lse_s_ptr + row, lse_s)
    tl.store(lse_t_ptr + row, lse_t)
    tl.store(d_ptr + row, d)
    tl.store(aux_ptr + row, aux)
    tl.store(s_lab_ptr + row, s_lab)
    tl.store(t_lab_ptr + row, t_lab)
    tl.store(gap_ptr + row, gap)


# l = x_y / tau - logsumexp(x / tau), online max/sum over vocabulary tiles (all -inf tiles
# allowed); 0 on ignored rows.
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
            base = safe_base(new_m)
            acc = acc * tl.exp(m - base) + tl.sum(tl.exp(x - base), 0)
            m = new_m
        out = tl.load(x_row + y).to(tl.float32) * inv_tau - (m + tl.log(acc))
    tl.store(out_ptr + row, out)


def row_stats(z, u, labels, *, divergence: str, tau: float, alpha: float, ignore_index: int,
              max_block: int):
    """Per-row (lse_S, lse_T, D, aux, s_y, t_y, lse_S - lse_T), float32 (B, T) each."""
    B, T, V = z.shape
    outs = [torch.empty((B, T), dtype=torch.float32, device=z.device) for _ in range(7)]
    block, warps = launch_geometry(V, max_block)
    _stats_kernel[(B * T,)](
        z, u, labels, *outs, T, V, *strides_bt(z), *strides_bt(u), *strides_bt(labels),
        1.0 / tau, alpha, ignore_index,
        DIV=DIVERGENCE_CODE[divergence], BLOCK=block, num_warps=warps,
    )
    return RowStats(*outs)


def label_logprob(x, labels, *, tau: float, ignore_index: int, max_block: int):
    """log softmax(x / tau)[labels] per row as float32 (B, T); 0 on ignored rows."""
    B, T, V = x.shape
    out = torch.empty((B, T), dtype=torch.float32, device=x.device)
    block, warps = launch_geometry(V, max_block)
    _label_logprob_kernel[(B * T,)](
        x, labels, out, T, V, *strides_bt(x), *strides_bt(labels), 1.0 / tau, ignore_index,
        BLOCK=block, num_warps=warps,
    )
    return out

