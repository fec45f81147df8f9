"""Shared pieces of the row kernels: int64 row addressing, the launch geometry and the
cancellation-free helpers."""

from __future__ import annotations

import os

import triton
import triton.language as tl

DIVERGENCE_CODE = {"fkl": 0, "rkl": 1, "jsd": 2}
FKL = tl.constexpr(DIVERGENCE_CODE["fkl"])
RKL = tl.constexpr(DIVERGENCE_CODE["rkl"])
JSD = tl.constexpr(DIVERGENCE_CODE["jsd"])
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Decorated for Triton's interpreter (TRITON_INTERPRET=1 when this module is imported).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
# The fast passes take the series below |x| < SERIES_BOUND and the direct form above it.
SERIES_BOUND = tl.constexpr(0.25)


# Row r of a (B, T, ...) tensor with strides (sb, st) starts at (r // T) * sb + (r % T) * st.
# r is promoted to int64 first, so tokens x vocab above 2^31 elements address correctly.
@triton.jit
def row_offset(row, T, stride_b, stride_t):
    row = row.to(tl.int64)
    return (row // T) * stride_b + (row % T) * stride_t


# float32 -> bfloat16 with round-to-nearest-even. Triton's interpreter truncates in
# .to(bfloat16): there, on the bit pattern, add 0x7FFF plus the lowest kept bit and keep the
# high half; the compiled cast rounds to nearest even itself (one F2FP per two values), so
# both paths give the same bits.
@triton.jit
def to_bf16_rne(x):
    if INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


def launch_geometry(vocab: int, max_block: int) -> tuple[int, int]:
    """(BLOCK, num_warps): a power-of-two vocabulary tile of at most ``max_block`` columns."""
    block = min(max_block, triton.next_power_of_2(vocab))
    if block >= 4096:
        warps = 16
    elif block >= 2048:
        warps = 8
    else:
        warps = 4
    return block, warps


def strides_bt(x) -> tuple[int, int]:
    """Batch and time strides of a (B, T, ...) tensor."""
    return x.stride(0), x.stride(1)


# The cancellation-free helpers of docs/losses.md ("Accuracy when the student is close to the
# teacher"), Triton twins of unisd_fast/backends/stable.py. No libdevice: series and exp/log only.

# e^x - 1 - x for |x| < 0.5 (the caller masks x): x^2 (1/2! + x/3! + ... + x^7/9!).
@triton.jit
def expm1_minus_x_series(x):
    p = 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    return x * x * p


# log(1 + w) - w: for |w| < 0.25, with r = w / (2 + w), -w^2 / (2 + w) + 2 r^3 (1/3 + r^2/5
# + ...); the direct difference above.
@triton.jit
def log1p_minus_w(w):
    small = tl.abs(w) < 0.25
    ws = tl.where(small, w, 0.0)
    r = ws / (2.0 + ws)
    r2 = r * r
    p = 1.0 / 11.0
    p = p * r2 + 1.0 / 9.0
    p = p * r2 + 1.0 / 7.0
    p = p * r2 + 1.0 / 5.0
    p = p * r2 + 1.0 / 3.0
    series = -ws * ws / (2.0 + ws) + 2.0 * r * r2 * p
    return tl.where(small, series, tl.log(1.0 + w) - w)


# (D, L, near) from the shifted sums of stable.shifted_kl: a = E_p[x], b = E_p[e^x - 1 - x],
# L = log1p(a + b), D = b + (log1p(a + b) - (a + b)) for |a + b| < 0.25, else L - a;
# near = (a + b >= -0.5): callers take the textbook sums on the other rows, where log1p loses
# digits (E_p[e^x] far below 1) and D is not small.
@triton.jit
def shifted_kl_finish(a, b):
    w = a + b
    f = log1p_minus_w(w)
    small = tl.abs(w) < 0.25
    lg = tl.where(small, w + f, tl.log(1.0 + w))
    d = tl.where(small, b + f, lg - a)
    return d, lg, w >= -0.5


# log((1 - k) + k e^y) and its second-order remainder q = that - k y, accurate for small y
# (series) and finite for large y (log-add-exp); y = -inf gives log(1 - k).
@triton.jit
def mix_log_terms(y, k, log_k, log_1mk):
    small = tl.abs(y) < 0.25
    ys = tl.where(small, y, 0.0)
    g = expm1_minus_x_series(ys)
    w = k * (ys + g)
    f = log1p_minus_w(w)
    b = log_k + y
    mx = tl.maximum(b, log_1mk)
    far = mx + tl.log(tl.exp(log_1mk - mx) + tl.exp(b - mx))
    lk = tl.where(small, w + f, far)
    q = tl.where(small, k * g + f, far - k * y)
    return lk, q


# log2 x for positive normal x: compiled, one MUFU.LG2 (lg2.approx.ftz.f32, absolute error
# about 2^-22; tl.log2 is a 20-instruction software log); the interpreter's exact log2.
@triton.jit
def approx_log2(x):
    if INTERPRETED:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)


# 1 / x: compiled, one MUFU.RCP (rcp.approx.ftz.f32, within 1 ulp); the interpreter's exact
# division.
@triton.jit
def approx_rcp(x):
    if INTERPRETED:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)


# Short series of the fast passes, for |x| < SERIES_BOUND (callers select): truncation below
# 2e-8 relative there. e^x - 1 - x = x^2 (E(x^2) + x O(x^2)) with the even part
# E = 1/2 + x^2/24 + x^4/720 and the odd part O = 1/6 + x^2/120 + x^4/5040; returns it at x
# and at -x (x^2 (E - x O)), which share E and O.
@triton.jit
def expm1_minus_x_short(x):
    x2 = x * x
    even = (x2 * (1.0 / 720.0) + 1.0 / 24.0) * x2 + 0.5
    odd = (x2 * (1.0 / 5040.0) + 1.0 / 120.0) * x2 + 1.0 / 6.0
    return x2 * (even + x * odd), x2 * (even - x * odd)


# q(r) = log((1 - a) + a e^r) - a r = sum_n k_n r^n / n! (n >= 2), k_n the cumulants of a
# Bernoulli(a) variable; with w = a (1 - a), h = 1 - 2a: k2 = w, k3 = w h, k4 = w (1 - 6w),
# k5 = w h (1 - 12w), k6 = w (1 - 30w + 120w^2), k7 = w h (1 - 60w + 360w^2),
# k8 = w (1 - 126w + 1680w^2 - 5040w^3). The series converges for |r| < pi; to r^8 it is
# within 2e-8 relative for |r| < SERIES_BOUND. Returns k_n / n! for n = 2..8.
@triton.jit
def mix_remainder_coefficients(a):
    w = a * (1.0 - a)
    h = 1.0 - 2.0 * a
    c2 = w / 2.0
    c3 = w * h / 6.0
    c4 = w * (1.0 - 6.0 * w) / 24.0
    c5 = w * h * (1.0 - 12.0 * w) / 120.0
    c6 = w * (1.0 - 30.0 * w + 120.0 * w * w) / 720.0
    c7 = w * h * (1.0 - 60.0 * w + 360.0 * w * w) / 5040.0
    c8 = w * (1.0 - 126.0 * w + 1680.0 * w * w - 5040.0 * w * w * w) / 40320.0
    return c2, c3, c4, c5, c6, c7, c8


@triton.jit
def mix_remainder_series(r, c2, c3, c4, c5, c6, c7, c8):
    p = c8 * r + c7
    p = p * r + c6
    p = p * r + c5
    p = p * r + c4
    p = p * r + c3
    p = p * r + c2
    return r * r * p


# Running maximum that tolerates all -inf tiles: the exponent base is 0 while the maximum is
# still -inf, so exp(x - base) is 0 for x = -inf and never NaN.
@triton.jit
def safe_base(m):
    return tl.where(m == float("-inf"), 0.0, m)
