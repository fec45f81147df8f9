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
    JSD,
    LN2,
    LOG2E,
    RKL,
    SERIES_BOUND,
    approx_log2,
    approx_rcp,
    expm1_minus_x_series,
    expm1_minus_x_short,
    launch_geometry,
    mix_log_terms,
    mix_remainder_coefficients,
    mix_remainder_series,
    row_offset,
    safe_base,
    shifted_kl_finish,
    strides_bt,
)


# Fast stats pass. With s = z / tau, t = u / tau and x = (z - u) / tau - mu (mu: x at the
# label), lse_S - lse_T = mu + log E_T[e^x] and KL(p_T||p_S) = log E_T[e^x] - E_T[x]
# (docs/losses.md, "Accuracy when the student is close to the teacher"), so one weighted
# family of sums gives both log-sum-exps and D:
#   fkl: w = 2^(t log2(e) - c_T): l_T = sum w, A_T = sum w x, G_T = sum w (e^x - 1 - x);
#        a = A_T / l_T, b = G_T / l_T, D = b + f(a + b) (f(w) = log1p(w) - w),
#        gap = lse_S - lse_T = mu + log1p(a + b), lse_T = c_T ln 2 + log l_T, lse_S = lse_T + gap;
#   rkl: the mirror (student weights, -x): gap = mu - log1p(a' + b');
#   jsd: both, then a second read of the row with r = lp_T - lp_S = (u - z) / tau + gap and
#        q(r) = log((1-a) + a e^r) - a r: KL(p_T||M) = (1-a) D_fkl - sum p_T q,
#        AUX = KL(p_S||M) = a D_rkl - sum p_S q, D = a KL(p_T||M) + (1-a) AUX.
# The sums are per-thread (one slot per tile column), reduced once after the loop. The shift
# c is the first tile's maximum, fixed for the row: no running maximum, no rescaling; a row
# whose sums overflow (a logit 88 nats above the first tile's maximum), that has a -inf
# logit (masked columns, a one-sided -inf) or whose E_T[e^x] is far below 1 (a + b < -0.5)
# gets non-finite or flagged sums and redo = 1: _stats_exact_kernel recomputes it.
# e^x - 1 - x takes the series for |x| < SERIES_BOUND and the direct form beyond (one select).
# Rows whose label is ignore_index write zeros and read nothing.
@triton.jit
def _shifted_sums(zf, uf, keep, mu, inv_tau, scale2, c_t, c_s, l_t, a_t, g_t, l_s, a_s, g_s,
                  DIV: tl.constexpr, MASKED: tl.constexpr):
    x = (zf - uf) * inv_tau - mu
    if MASKED:
        x = tl.where(keep, x, 0.0)
    small = tl.abs(x) < SERIES_BOUND
    series_x, series_nx = expm1_minus_x_short(x)
    if DIV != RKL:
        w = tl.exp2(uf * scale2 - c_t)
        ex = tl.exp2(x * LOG2E)
        gx = tl.where(small, series_x, ex - 1.0 - x)
        l_t += w
        a_t += w * x
        g_t += w * gx
    if DIV != FKL:
        v = tl.exp2(zf * scale2 - c_s)
        if DIV == RKL:
            enx = tl.exp2(x * -LOG2E)
        else:
            enx = approx_rcp(ex)
        gn = tl.where(small, series_nx, enx - 1.0 + x)
        l_s += v
        a_s -= v * x
        g_s += v * gn
    return l_t, a_t, g_t, l_s, a_s, g_s


@triton.jit
def _full_tile_sums(z_row, u_row, start, mu, inv_tau, scale2, c_t, c_s,
                    l_t, a_t, g_t, l_s, a_s, g_s, DIV: tl.constexpr, BLOCK: tl.constexpr):
    cols = start + tl.arange(0, BLOCK)
    zf = tl.load(z_row + cols).to(tl.float32)
    uf = tl.load(u_row + cols).to(tl.float32)
    return _shifted_sums(zf, uf, cols < start + BLOCK, mu, inv_tau, scale2, c_t, c_s,
                         l_t, a_t, g_t, l_s, a_s, g_s, DIV, False)


@triton.jit
def _mixture_remainders(zf, uf, keep, inv_tau, scale2, ls2, lt2, gap, alpha, log_1ma,
                        c2, c3, c4, c5, c6, c7, c8, q_t, q_s, MASKED: tl.constexpr):
    r = (uf - zf) * inv_tau + gap
    if MASKED:
        r = tl.where(keep, r, 0.0)
    q = tl.where(tl.abs(r) < SERIES_BOUND, mix_remainder_series(r, c2, c3, c4, c5, c6, c7, c8),
                 approx_log2((1.0 - alpha) + alpha * tl.exp2(r * LOG2E)) * LN2 - alpha * r)
    q_t += tl.exp2(uf * scale2 - lt2) * q
    q_s += tl.exp2(zf * scale2 - ls2) * q
    return q_t, q_s


@triton.jit
def _stats_kernel(
    z_ptr, u_ptr, y_ptr,
    lse_s_ptr, lse_t_ptr, d_ptr, aux_ptr, s_lab_ptr, t_lab_ptr, gap_ptr, redo_ptr,
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
    redo = tl.zeros((), tl.int32)
    if y != ignore_index:
        z_row = z_ptr + row_offset(row, T, z_sb, z_st)
        u_row = u_ptr + row_offset(row, T, u_sb, u_st)
        z_y = tl.load(z_row + y).to(tl.float32)
        u_y = tl.load(u_row + y).to(tl.float32)
        mu = (z_y - u_y) * inv_tau
        scale2 = inv_tau * LOG2E
        cols = tl.arange(0, BLOCK)
        keep = cols < V
        zf = tl.load(z_row + cols, mask=keep, other=float("-inf")).to(tl.float32)
        uf = tl.load(u_row + cols, mask=keep, other=float("-inf")).to(tl.float32)
        c_t = safe_base(tl.max(uf, 0) * scale2)
        c_s = safe_base(tl.max(zf, 0) * scale2)
        acc = tl.zeros((BLOCK,), tl.float32)
        l_t, a_t, g_t, l_s, a_s, g_s = _shifted_sums(
            zf, uf, keep, mu, inv_tau, scale2, c_t, c_s, acc, acc, acc, acc, acc, acc,
            DIV, True)
        full = V // BLOCK
        if DIV == JSD:
            # half-width tiles (its six sums fit 64 registers), two per iteration: the
            # loop's own instructions per column as for a whole tile
            for i in range(0, (full - 1) // 2):
                for half in tl.static_range(2):
                    l_t, a_t, g_t, l_s, a_s, g_s = _full_tile_sums(
                        z_row, u_row, (1 + 2 * i + half) * BLOCK, mu, inv_tau, scale2, c_t,
                        c_s, l_t, a_t, g_t, l_s, a_s, g_s, DIV, BLOCK)
            if (full >= 2) & ((full - 1) % 2 == 1):
                l_t, a_t, g_t, l_s, a_s, g_s = _full_tile_sums(
                    z_row, u_row, (full - 1) * BLOCK, mu, inv_tau, scale2, c_t, c_s,
                    l_t, a_t, g_t, l_s, a_s, g_s, DIV, BLOCK)
        else:
            for i in range(1, full):
                l_t, a_t, g_t, l_s, a_s, g_s = _full_tile_sums(
                    z_row, u_row, i * BLOCK, mu, inv_tau, scale2, c_t, c_s,
                    l_t, a_t, g_t, l_s, a_s, g_s, DIV, BLOCK)
        if (full >= 1) & (full * BLOCK < V):
            cols = full * BLOCK + tl.arange(0, BLOCK)
            keep = cols < V
            zf = tl.load(z_row + cols, mask=keep, other=float("-inf")).to(tl.float32)
            uf = tl.load(u_row + cols, mask=keep, other=float("-inf")).to(tl.float32)
            l_t, a_t, g_t, l_s, a_s, g_s = _shifted_sums(
                zf, uf, keep, mu, inv_tau, scale2, c_t, c_s, l_t, a_t, g_t, l_s, a_s, g_s,
                DIV, True)
        ok = mu == mu
        if DIV != RKL:
            sum_t = tl.sum(l_t, 0)
            d_f, lg_t, near_t = shifted_kl_finish(tl.sum(a_t, 0) / sum_t, tl.sum(g_t, 0) / sum_t)
            ok = ok & near_t & (tl.abs(d_f) < float("inf"))
            lse_t = c_t * LN2 + tl.log(sum_t)
            gap = lg_t + mu
        if DIV != FKL:
            sum_s = tl.sum(l_s, 0)
            d_r, lg_s, near_s = shifted_kl_finish(tl.sum(a_s, 0) / sum_s, tl.sum(g_s, 0) / sum_s)
            ok = ok & near_s & (tl.abs(d_r) < float("inf"))
            lse_s = c_s * LN2 + tl.log(sum_s)
            if DIV == RKL:
                gap = mu - lg_s
        if DIV == FKL:
            lse_s = lse_t + gap
            d = d_f
        elif DIV == RKL:
            lse_t = lse_s - gap
            d = d_r
        elif ok:
            c2, c3, c4, c5, c6, c7, c8 = mix_remainder_coefficients(alpha)
            log_1ma = tl.log(1.0 - alpha)
            ls2 = lse_s * LOG2E
            lt2 = lse_t * LOG2E
            q_t = tl.zeros((BLOCK,), tl.float32)
            q_s = tl.zeros((BLOCK,), tl.float32)
            for i in range(0, full // 2):
                for half in tl.static_range(2):
                    cols = (2 * i + half) * BLOCK + tl.arange(0, BLOCK)
                    zf = tl.load(z_row + cols).to(tl.float32)
                    uf = tl.load(u_row + cols).to(tl.float32)
                    q_t, q_s = _mixture_remainders(zf, uf, keep, inv_tau, scale2, ls2, lt2,
                                                   gap, alpha, log_1ma, c2, c3, c4, c5, c6,
                                                   c7, c8, q_t, q_s, False)
            if full % 2 == 1:
                cols = (full - 1) * BLOCK + tl.arange(0, BLOCK)
                zf = tl.load(z_row + cols).to(tl.float32)
                uf = tl.load(u_row + cols).to(tl.float32)
                q_t, q_s = _mixture_remainders(zf, uf, keep, inv_tau, scale2, ls2, lt2, gap,
                                               alpha, log_1ma, c2, c3, c4, c5, c6, c7, c8,
                                               q_t, q_s, False)
            if full * BLOCK < V:
                cols = full * BLOCK + tl.arange(0, BLOCK)
                keep = cols < V
                zf = tl.load(z_row + cols, mask=keep, other=float("-inf")).to(tl.float32)
                uf = tl.load(u_row + cols, mask=keep, other=float("-inf")).to(tl.float32)
                q_t, q_s = _mixture_remainders(zf, uf, keep, inv_tau, scale2, ls2, lt2, gap,
                                               alpha, log_1ma, c2, c3, c4, c5, c6, c7, c8,
                                               q_t, q_s, True)
            aux = alpha * d_r - tl.sum(q_s, 0)
            d = alpha * ((1.0 - alpha) * d_f - tl.sum(q_t, 0)) + (1.0 - alpha) * aux
            ok = tl.abs(d) < float("inf")
        s_lab = z_y * inv_tau - lse_s
        t_lab = u_y * inv_tau - lse_t
        redo = tl.where(ok, 0, 1)
    tl.store(lse_s_ptr + row, lse_s)
    tl.store(lse_t_ptr + row, lse_t)
    tl.store(d_ptr + row, d)
    tl.store(aux_ptr + row, aux)
    tl.store(s_lab_ptr + row, s_lab)
    tl.store(t_lab_ptr + row, t_lab)
    tl.store(gap_ptr + row, gap)
    tl.store(redo_ptr + row, redo)


# The exact stats of the rows the fast pass flagged (redo != 0), every other row untouched.
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
@triton.jit
def _stats_exact_kernel(
    z_ptr, u_ptr, y_ptr,
    lse_s_ptr, lse_t_ptr, d_ptr, aux_ptr, s_lab_ptr, t_lab_ptr, gap_ptr, redo_ptr,
    T, V, z_sb, z_st, u_sb, u_st, y_sb, y_st,
    inv_tau, alpha,
    DIV: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(redo_ptr + row) != 0:
        y = tl.load(y_ptr + row_offset(row, T, y_sb, y_st)).to(tl.int64)
        aux = tl.zeros((), tl.float32)
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
        tl.store(lse_s_ptr + row, lse_s)
        tl.store(lse_t_ptr + row, lse_t)
        tl.store(d_ptr + row, d)
        tl.store(aux_ptr + row, aux)
        tl.store(s_lab_ptr + row, z_y * inv_tau - lse_s)
        tl.store(t_lab_ptr + row, u_y * inv_tau - lse_t)
        tl.store(gap_ptr + row, gap)


# l = x_y / tau - logsumexp(x / tau) with per-thread running maxima (one slot per tile
# column) in base 2, xs = x log2(e) / tau: with d = xs - m, one exponential per element,
# e = 2^-|d|: the slot's sum becomes sum e + ... when d <= 0, sum * e + 1 when d > 0 (the new
# maximum), m = max(m, xs); -inf columns add 0 (m starts at -FLT_MAX, never -inf). After the
# loop, M = max m and L = sum over slots of sum 2^(m - M). 0 on ignored rows.
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
        scale2 = inv_tau * LOG2E
        m = tl.full((BLOCK,), -3.4028234663852886e38, tl.float32)
        acc = tl.zeros((BLOCK,), tl.float32)
        full = V // BLOCK
        for i in range(0, full):
            xs = tl.load(x_row + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32) * scale2
            m, acc = _running_sum(xs, m, acc)
        if full * BLOCK < V:
            cols = full * BLOCK + tl.arange(0, BLOCK)
            xs = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m, acc = _running_sum(xs * scale2, m, acc)
        top = tl.max(m, 0)
        total = tl.sum(acc * tl.exp2(m - top), 0)
        out = tl.load(x_row + y).to(tl.float32) * inv_tau - (top + tl.log2(total)) * LN2
    tl.store(out_ptr + row, out)


@triton.jit
def _running_sum(xs, m, acc):
    d = xs - m
    e = tl.exp2(-tl.abs(d))
    up = d > 0.0
    return tl.maximum(m, xs), tl.where(up, acc * e + 1.0, acc + e)


# Registers per thread of the fast stats kernel: 64 keeps two 16-warp programs on an SM
# (docs/kernels.md, "Compiled cost"); jsd's six per-column sums take half a tile per thread
# to fit.
STATS_REGISTERS = 64
# The exact kernel's tile: at most 2048 columns, over 16 warps (four columns per thread) at
# that width, launch_geometry's warps below it; it runs on rare rows, and so has no spill on
# sm_80 or sm_90a (python -m benchmarks.gpu_static).
EXACT_BLOCK = 2048
EXACT_WARPS = 16


def row_stats(z, u, labels, *, divergence: str, tau: float, alpha: float, ignore_index: int,
              max_block: int):
    """Per-row (lse_S, lse_T, D, aux, s_y, t_y, lse_S - lse_T), float32 (B, T) each."""
    B, T, V = z.shape
    outs = [torch.empty((B, T), dtype=torch.float32, device=z.device) for _ in range(7)]
    redo = torch.empty((B, T), dtype=torch.int32, device=z.device)
    block, warps = launch_geometry(V, max_block)
    args = (T, V, *strides_bt(z), *strides_bt(u), *strides_bt(labels), 1.0 / tau, alpha)
    fast_block = block // 2 if divergence == "jsd" and block >= 1024 else block
    # rows that start on 16-byte boundaries load 16-byte vectors and fit the register cap;
    # others load element by element and would spill under it
    aligned = all(s * z.element_size() % 16 == 0 for s in (*strides_bt(z), *strides_bt(u)))
    _stats_kernel[(B * T,)](z, u, labels, *outs, redo, *args, ignore_index,
                            DIV=DIVERGENCE_CODE[divergence], BLOCK=fast_block,
                            num_warps=warps, maxnreg=STATS_REGISTERS if aligned else None)
    # the flagged rows again, exactly; the others return at once (no host sync)
    block, warps = launch_geometry(V, min(max_block, EXACT_BLOCK))
    _stats_exact_kernel[(B * T,)](z, u, labels, *outs, redo, *args,
                                  DIV=DIVERGENCE_CODE[divergence], BLOCK=block,
                                  num_warps=EXACT_WARPS if block == EXACT_BLOCK else warps)
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

