"""Cancellation-free pieces of the divergences when the student is close to the teacher.

PyTorch forms of the functions of docs/losses.md, "Accuracy when the student is close to the
teacher", shared by the PyTorch backend and the float32 path of the reference. The Triton
kernels have their own twins (``backends/triton/common.py``).
"""

from __future__ import annotations

import torch

# Below these magnitudes the series are used; above them the direct forms lose no digits.
EXPM1_SERIES_MAX = 0.5
LOG1P_SERIES_MAX = 0.25
# shifted_kl's log1p(w) is trusted for w = E_p[e^x] - 1 >= NEAR_MIN.
NEAR_MIN = -0.5
# mix_kl_terms takes its non-negative form on rows whose log-ratios all lie below this.
MIX_NEAR_MAX_LOG_RATIO = 8.0

# 1/2!, 1/3!, ..., 1/9!: e^x - 1 - x = x^2 (1/2! + x/3! + ...), truncation < 3e-9 relative.
_EXP_COEFFS = (1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040, 1 / 40320, 1 / 362880)
# 1/3, 1/5, ...: 2 atanh(r) - 2r = 2 r^3 (1/3 + r^2/5 + ...).
_ATANH_COEFFS = (1 / 3, 1 / 5, 1 / 7, 1 / 9, 1 / 11)


def _horner(x, coeffs):
    acc = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return acc


def expm1_minus_x_series(x):
    """e^x - 1 - x by its series: full relative accuracy for |x| < 0.5 only. Callers mask
    larger |x| away. (Near 0 this also stands in for ``torch.expm1``, which torch.compile's
    CPU code forms as exp(x) - 1 and so loses the digits there.)"""
    return x * x * _horner(x, _EXP_COEFFS)


def log1p_minus_w(w):
    """log(1 + w) - w with full relative accuracy: for |w| < 0.25, with r = w / (2 + w),
    log(1 + w) = 2 atanh(r), so log(1 + w) - w = -w^2 / (2 + w) + 2 r^3 (1/3 + r^2/5 + ...)."""
    small = w.abs() < LOG1P_SERIES_MAX
    ws = torch.where(small, w, 0.0)
    r = ws / (2 + ws)
    r2 = r * r
    series = -ws * ws / (2 + ws) + 2 * r * r2 * _horner(r2, _ATANH_COEFFS)
    return torch.where(small, series, torch.log1p(w) - w)


def shifted_terms(w, x, we):
    """Per-column pieces of ``shifted_kl`` for weights ``w`` (p times any positive row
    factor) and ``we`` = w e^x: (w x, w (e^x - 1 - x), w expm1(x)), from the series where
    |x| < 0.5 and the direct differences elsewhere (they lose a few bits at most, next to
    |x| = 0.5). The second is formed from the third, so that a compiled caller that also
    uses w expm1(x) stores it between its passes instead of forming the series again."""
    small = x.abs() < EXPM1_SERIES_MAX
    xs = torch.where(small, x, 0.0)
    series = expm1_minus_x_series(xs)
    wx = w * x
    wm = torch.where(small, w * (xs + series), we - w)
    return wx, torch.where(small, w * series, wm - wx), wm


def shifted_finish(a, b):
    """(D, L, near) from the row values a = E_p[x] and b = E_p[e^x - 1 - x] >= 0:
    L = log1p(a + b) and D = b + (log1p(a + b) - (a + b)), two terms with no cancellation
    when a + b is small; for |a + b| >= 0.25 D = L - a directly. ``near`` marks the rows with
    E_p[e^x] = 1 + a + b >= 1/2. Below, L = log1p(a + b) loses digits (a shift far above the
    p-mean of the log-ratio): a caller whose shift is not that mean uses the textbook form on
    those rows, where D is not small."""
    w = a + b
    lg = torch.log1p(w)
    d = torch.where(w.abs() < LOG1P_SERIES_MAX, b + log1p_minus_w(w), lg - a)
    return d, lg, w >= NEAR_MIN


def shifted_kl(p, x, log_pe):
    """(D, L, near) with L = log E_p[e^x] and D = L - E_p[x], reduced over the last dimension
    (``shifted_finish``). ``p`` are normalised weights, ``x`` the (shifted) log-ratio and
    ``log_pe`` = log(p e^x), used where |x| is large so that nothing overflows. The sums
    accumulate in float64 (float32 over 32k terms drifts by several ulps once compiled)."""
    px, term, _ = shifted_terms(p, x, torch.exp(log_pe))
    d, lg, near = shifted_finish(px.sum(-1, dtype=torch.float64),
                                 term.sum(-1, dtype=torch.float64))
    return d.to(p.dtype), lg.to(p.dtype), near


def log1p_alpha_expm1(r, log_a, log_1ma):
    """log((1 - a) + a e^r) = log1p(a expm1(r)), accurate for small r and finite for large."""
    small = r.abs() < EXPM1_SERIES_MAX
    a = torch.exp(log_a)
    rs = torch.where(small, r, 0.0)
    near = torch.log1p(a * (rs + expm1_minus_x_series(rs)))
    far = torch.logaddexp(log_1ma.expand_as(r), log_a + r)
    return torch.where(small, near, far)


def expm1_stable(x):
    """e^x - 1, from the series where |x| < 0.5 (compiled CPU code forms ``torch.expm1`` as
    exp(x) - 1, see ``expm1_minus_x_series``) and directly beyond."""
    small = x.abs() < EXPM1_SERIES_MAX
    xs = torch.where(small, x, 0.0)
    return torch.where(small, xs + expm1_minus_x_series(xs), torch.exp(x) - 1)


def mix_kl_terms(y, k, log_k, log_1mk, near):
    """Per-column terms c of KL(p || M) = sum p c for the mixture M = (1 - k) p + k q, with
    y = log(q / p) per column and ``near`` a per-row mask (broadcast over the columns):
      near rows: c = w - log1p(w) >= 0 with w = k expm1(y), since sum p expm1(y) = sum q -
        sum p = 0: no term cancels another, and an error common to every y (the rows'
        log-sum-exp gap) enters only at second order, so D keeps its digits however small;
      other rows: c = -log((1 - k) + k e^y) directly (``log1p_alpha_expm1``): the terms are
        large, k expm1(y) may overflow, and the dropped sum would cost more than it saves.
    Callers mark rows near when every |y| < MIX_NEAR_MAX_LOG_RATIO."""
    w = k * expm1_stable(torch.where(near, y, 0.0))
    return torch.where(near, -log1p_minus_w(w), -log1p_alpha_expm1(y, log_k, log_1mk))
