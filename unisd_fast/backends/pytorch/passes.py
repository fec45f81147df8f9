"""The stats, label and gradient passes of the Triton kernels in PyTorch, on 2-D blocks of
rows: the math of the PyTorch backend (``backend.py`` runs these over row blocks, compiled
where a compiler works).

The per-block math follows docs/losses.md, "Accuracy when the student is close to the
teacher"; docs/kernels.md, "The CPU backend", describes the passes. Every function takes the
run-time scalars (tau, alpha) as 0-dim tensors, so that a compiled graph serves every value
(alpha in float64, see ``_mix_weights``);
the divergence (and the gradient's target) come last, as constants that
``compiler.specialise`` binds, one compiled function each.
"""

from __future__ import annotations

import torch

from ..protocol import RowStats
from ..stable import (
    MIX_NEAR_MAX_LOG_RATIO,
    expm1_minus_x_series,
    log1p_alpha_expm1,
    mix_kl_terms,
    shifted_finish,
    shifted_kl,
    shifted_terms,
)

# Up to this many columns the small-input pass sums in float32 (a compiled float32 sum of
# 4096 terms stays within a few ulps; over 32k it drifts), beyond it in float64.
FLOAT32_SUM_COLUMNS = 4096
NEG_INF = float("-inf")


def _columns(zf, uf):
    """Masks of columns where both sides are -inf (dropped: probability 0 on both sides) and
    where exactly one side is (handled by the textbook formulas)."""
    z_inf = zf == NEG_INF
    u_inf = uf == NEG_INF
    return z_inf & u_inf, z_inf ^ u_inf


def _logsumexp(x):
    """log sum exp(x) over the last dimension (kept), the sum accumulated in float64:
    compiled, a float32 accumulation over 32k columns is off by several ulps, and every
    probability exp(x - lse) inherits that relative error (eager torch.logsumexp is exact)."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(m.isfinite(), m, 0.0)
    total = torch.exp(x - m).sum(-1, keepdim=True, dtype=torch.float64)
    return (m.double() + total.log()).to(x.dtype)


def _mix_weights(alpha):
    """(a, 1 - a, log a, log(1 - a)) as float32 0-dim tensors from the float64 0-dim
    ``alpha``: 1 - a is formed before rounding (from a float32 alpha of 0.999 it is off by
    1.3e-5 relative, and so is every term it weights)."""
    return tuple(v.float() for v in (alpha, 1 - alpha, torch.log(alpha), torch.log1p(-alpha)))


def _log_softmax(x, tau):
    """(lse in float64, float32 log-probs) of x / tau over the last dimension (lse kept),
    from the differences to the row maximum: (x - max) / tau costs no digits where x / tau
    would (a peaked row of logits / tau of size 40 keeps p_max to an ulp, not to 40 ulps);
    the sum in float64 as in _logsumexp."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(m.isfinite(), m, 0.0)
    b = (x - m) / tau
    log_total = torch.exp(b).sum(-1, keepdim=True, dtype=torch.float64).log()
    return m.double() / tau + log_total, b - log_total.float()


def anchor(lse, tau):
    """(c, e), float32 per row, with lse = c / tau + e for the float64 log-sum-exps ``lse``:
    c = tau lse rounded (a logit near the row's largest), e the small rest, formed in float64.
    log p = (x - c) / tau - e then keeps the digits that x / tau - lse loses in float32 when
    logits / tau are large (``log_probs``)."""
    c = (lse * tau).float()
    return c, (lse - c.double() / tau).float()


def log_probs(x, c, e, tau):
    """log softmax(x / tau) of a block from its rows' ``anchor`` (c, e)."""
    return (x - c.unsqueeze(-1)) / tau - e.unsqueeze(-1)


def row_stats(values, *shape):
    """``RowStats`` of the float64 (7, rows) stack of the stats passes, viewed as ``shape``:
    the log-sum-exps stay float64 (``anchor``), the rest float32."""
    lse_s, lse_t, *rest = values.view(7, *shape).unbind(0)
    return RowStats(lse_s, lse_t, *(v.float() for v in rest))


def _xlogy_terms(p, diff):
    """p * diff with 0 where p == 0 (0 log 0 = 0)."""
    return torch.where(p == 0, 0.0, p * diff)


def _xlogy_sum(p, diff):
    """_xlogy_terms summed over the last dimension, accumulated in float64 (see
    _logsumexp)."""
    return _xlogy_terms(p, diff).sum(-1, dtype=torch.float64).to(p.dtype)


# Stats of one block of rows, with s = z / tau, t = u / tau, dx = s - t formed from z - u:
#   lse_S, lse_T; mu = dx at the peak of p_T (p_S for rkl; the mean over tied peaks), a
#   shift (see stable.shifted_kl) near the p-mean of dx even on nearly one-hot rows; x = dx - mu;
#   fkl: D, L = shifted_kl(p_T, x), lse_S - lse_T = L + mu
#   rkl: D, L = shifted_kl(p_S, -x), lse_S - lse_T = mu - L
#   jsd: gap from the fkl shift, r = lp_T - lp_S = gap - dx; per row, with M = (1-a) p_S +
#        a p_T, KL(p_T||M) and KL(p_S||M) from stable.mix_kl_terms (non-negative terms on
#        rows whose |r| stay below MIX_NEAR_MAX_LOG_RATIO, the direct log of the mixture
#        ratio elsewhere), D = a KL(p_T||M) + (1-a) KL(p_S||M).
# Rows with a one-sided -inf column, whose shifted sums overflow, or whose shifted mean
# E[e^x] is below 1/2 (student far from teacher, D not small) use the textbook forms
# (for jsd: the textbook gap; the textbook sums only on rows with a one-sided column).
# Returns the float64 (7, rows) stack of (lse_S, lse_T, D, aux, lp_S(y), lp_T(y),
# lse_S - lse_T) (``row_stats``), zero on rows where ``keep`` is False (ignored labels).
def stats(z, u, y, keep, tau, alpha, divergence: str):
    y = torch.where(keep, y, 0).long()
    zf = z.float()
    uf = u.float()
    both, one = _columns(zf, uf)
    lse_s, lp_s = _log_softmax(zf, tau)
    lse_t, lp_t = _log_softmax(uf, tau)
    p_s = lp_s.exp()
    p_t = lp_t.exp()
    dx = torch.where(both | one, 0.0, (zf - uf) / tau)
    base = zf if divergence == "rkl" else uf  # the raw logits: no wait on the log-sum-exp
    peak = base == base.amax(-1, keepdim=True)
    mu = torch.where(peak, dx, 0.0).sum(-1, keepdim=True) / peak.sum(-1, keepdim=True)
    mu = torch.where(mu.isfinite(), mu, 0.0)
    x = dx - mu
    classic_gap = (lse_s - lse_t).squeeze(-1).float()
    ok = ~one.any(-1)
    zeros = torch.zeros_like(classic_gap)
    if divergence == "rkl":
        d_r, lg, near = shifted_kl(p_s, -x, lp_s - x)
        ok = ok & near & d_r.isfinite()
        gap = (mu.squeeze(-1) - lg)
        classic = _xlogy_sum(p_s, lp_s - lp_t)
        d = torch.where(ok, d_r, classic)
        aux = zeros
    else:
        d_f, lg, near = shifted_kl(p_t, x, lp_t + x)
        ok = ok & near & d_f.isfinite()
        gap = lg + mu.squeeze(-1)
        if divergence == "fkl":
            d = torch.where(ok, d_f, _xlogy_sum(p_t, lp_t - lp_s))
            aux = zeros
        else:
            a, one_ma, log_a, log_1ma = _mix_weights(alpha)
            r = torch.where(ok, gap, classic_gap).unsqueeze(-1) - dx
            near = torch.where(both, 0.0, r).abs().amax(-1, keepdim=True) < \
                MIX_NEAR_MAX_LOG_RATIO
            kl_tm = _xlogy_sum(p_t, mix_kl_terms(-r, one_ma, log_1ma, log_a, near))
            kl_sm = _xlogy_sum(p_s, mix_kl_terms(r, a, log_a, log_1ma, near))
            log_m = torch.logaddexp(lp_s + log_1ma, lp_t + log_a)
            two_sided = ~one.any(-1)
            kl_tm = torch.where(two_sided, kl_tm, _xlogy_sum(p_t, lp_t - log_m))
            kl_sm = torch.where(two_sided, kl_sm, _xlogy_sum(p_s, lp_s - log_m))
            d = a * kl_tm + one_ma * kl_sm
            aux = kl_sm
    gap = torch.where(ok, gap, classic_gap)
    s_lab = lp_s.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    t_lab = lp_t.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    values = torch.stack((lse_s.squeeze(-1), lse_t.squeeze(-1), *(v.double() for v in (
        d, aux, s_lab, t_lab, gap))))
    return torch.where(keep, values, 0.0)


# log_softmax(x / tau)[y] of one block, 0 where ``keep`` is False; NaN where the log-sum-exp
# is not finite (a row holding +inf), as in the reference. The label is read from x itself,
# not from a log_softmax result, which the compiler would store as a block-sized buffer.
def label_block(x, y, keep, tau):
    y = torch.where(keep, y, 0).long()
    s = x.float() / tau
    lse = _logsumexp(s)
    value = torch.where(lse.isfinite(), s.gather(-1, y.unsqueeze(-1)) - lse, float("nan"))
    return torch.where(keep, value.squeeze(-1), 0.0)


# Gradient of one block, written into out:
#   dz = (ck * G + cc * (onehot(y) - p_S)) / tau, and 0 on rows with ck = cc = 0, with
#   log p_S, log p_T from the rows' ``anchor`` (c, e) of the float64 lse_S, lse_T, and
#   r = lp_T - lp_S = (u - z) / tau + (lse_S - lse_T) formed without cancellation and
#   fkl: G = p_S - p_T = p_T expm1(-r)       (p_S - p_T directly where |r| >= 0.5)
#   rkl: G = p_S (-r - D)
#   jsd: G = (1-a) p_S (-log1p(a expm1(r)) - AUX)
# Columns where both sides are -inf get 0; one-sided -inf columns use r = lp_T - lp_S.
# divergence_grad returns (G, p_S); grad writes dz into out (which may be z or u).
def divergence_grad(z, u, c_s, e_s, c_t, e_t, gap, d, aux, tau, alpha, divergence: str):
    zf = z.float()
    uf = u.float()
    both, one = _columns(zf, uf)
    lp_s = log_probs(zf, c_s, e_s, tau)
    lp_t = log_probs(uf, c_t, e_t, tau)
    p_s = lp_s.exp()
    p_t = lp_t.exp()
    r = torch.where(both, 0.0, (uf - zf) / tau) + gap.unsqueeze(-1)
    r = torch.where(one, lp_t - lp_s, r)
    if divergence == "fkl":
        near = r.abs() < 0.5
        e = -torch.where(near, r, 0.0)
        g_div = torch.where(near, p_t * (e + expm1_minus_x_series(e)), p_s - p_t)
    elif divergence == "rkl":
        g_div = _xlogy_terms(p_s, -r - d.unsqueeze(-1))
    else:
        _, one_ma, log_a, log_1ma = _mix_weights(alpha)
        lms = log1p_alpha_expm1(r, log_a, log_1ma)
        g_div = one_ma * _xlogy_terms(p_s, -lms - aux.unsqueeze(-1))
    return g_div, p_s


def grad(out, z, u, y, c_s, e_s, c_t, e_t, gap, d, aux, ck, cc, tau, alpha, divergence: str):
    g_div, p_s = divergence_grad(z, u, c_s, e_s, c_t, e_t, gap, d, aux, tau, alpha,
                                 divergence)
    cols = torch.arange(z.shape[-1], device=z.device)
    onehot = (cols == y.unsqueeze(-1)).float()
    g = (ck.unsqueeze(-1) * g_div + cc.unsqueeze(-1) * (onehot - p_s)) / tau
    active = ((ck != 0) | (cc != 0)).unsqueeze(-1)
    out.copy_(torch.where(active, g, 0.0))


# ``grad`` written over z itself (target "z": inplace_backward, the fused-linear chunks) or
# over u ("u": the fused-linear chunks with a soft-cap). Apart from ``grad``, so that a
# compiled graph is never handed one tensor twice, once mutated: torch.compile turns such
# aliased inputs into a "synthetic base" whose cached graphs fail when the base's size
# changes between processes.
def grad_into(z, u, y, c_s, e_s, c_t, e_t, gap, d, aux, ck, cc, tau, alpha, divergence: str,
              target: str):
    grad(z if target == "z" else u, z, u, y, c_s, e_s, c_t, e_t, gap, d, aux, ck, cc, tau,
         alpha, divergence)


# The small-input pass: the stats of ``stats`` and, from them in the same call, G / tau of
# ``divergence_grad`` (0 on ignored rows), which the backward scales by ck
# (``TorchBackend.row_stats_and_grad``).
def stats_grad(z, u, y, keep, tau, alpha, divergence: str):
    values = stats(z, u, y, keep, tau, alpha, divergence)
    lse_s, lse_t, d, aux, _, _, gap = values.unbind(0)
    g_div, _ = divergence_grad(z, u, *anchor(lse_s, tau), *anchor(lse_t, tau), gap.float(),
                               d.float(), aux.float(), tau, alpha, divergence)
    return values, torch.where(keep.unsqueeze(-1), g_div / tau, 0.0)


# The small-input pass of fkl and rkl on rows of finite logits: three reads of the logits,
# two exponentials per column. With p the teacher's distribution (fkl; the student's for
# rkl), w = exp(b) = p * total its unnormalised weights, b = (base - max base) / tau (the
# difference formed first, so that logits / tau of size 1000 cost no digits of p), and dx
# the other side's log-ratio over it ((z - u) / tau for fkl, (u - z) / tau for rkl):
#   read 1: max base;  read 2: w, total = sum w and mu = sum w dx / total, the p-mean of dx;
#   read 3: x = dx - mu has E_p[x] ~ 0, so E_p[e^x] >= 1 (Jensen) and the shifted sums never
#   need the textbook fallback of ``stats``: a, b = sum (w x, w (e^x - 1 - x)) / total, and
#   D, L = shifted_finish(a, b); the other side's log-sum-exp is lse_p + mu + L.
# With e = x - L (lp_other - lp_p), the gradient is formed from the stored w, w expm1(x)
# (shifted_terms) or x and per-row factors, with no transcendental per column:
#   fkl: G = p_S - p_T = p expm1(e) = (e^-L w expm1(x) + (e^-L - 1) w) / total,
#   rkl: G = p_S (lp_S - lp_T - D) = -p (e + D) = -p (x - a).
# The column sums run in float32 up to FLOAT32_SUM_COLUMNS columns (in float64 beyond), the
# per-row values in float64 (where e^-L - 1 is exact far beyond float32).
# Returns ``stats_grad``'s pair and a per-row ok flag: False on a kept row where anything is
# not finite (a non-finite or -inf input), whose block the caller runs through ``stats_grad``.
def stats_grad_shifted(z, u, y, keep, tau, divergence: str):
    acc = torch.float32 if z.shape[-1] <= FLOAT32_SUM_COLUMNS else torch.float64
    y = torch.where(keep, y, 0).long().unsqueeze(-1)
    zf = z.float()
    uf = u.float()
    base, other = (uf, zf) if divergence == "fkl" else (zf, uf)
    inv = 1 / tau
    m = base.amax(-1, keepdim=True)
    m = torch.where(m.isfinite(), m, 0.0)
    b = (base - m) * inv
    w = torch.exp(b)
    dx = (other - base) * inv
    total = w.sum(-1, keepdim=True, dtype=acc).double()
    mu = ((w * dx).sum(-1, keepdim=True, dtype=acc) / total).float()
    x = dx - mu
    wx, term, wm = shifted_terms(w, x, torch.exp(b + x))
    total = total.squeeze(-1)
    a = wx.sum(-1, dtype=acc) / total
    d, lg, near = shifted_finish(a, term.sum(-1, dtype=acc) / total)
    log_total = total.log()
    lse_p = m.squeeze(-1).double() / tau + log_total
    shift = mu.squeeze(-1) + lg
    scale = (inv / total).float().unsqueeze(-1)
    if divergence == "fkl":
        lse_s, lse_t = lse_p + shift, lse_p
        c = torch.exp(-lg)
        g = (c.float().unsqueeze(-1) * wm + (c - 1).float().unsqueeze(-1) * w) * scale
        gap = shift
    else:
        lse_s, lse_t = lse_p, lse_p + shift
        g = -(w * scale) * (x - a.float().unsqueeze(-1))
        gap = -shift
    # label log-probs from the differences to the row maximum, not from two log-sum-exps of
    # the size of the logits / tau: lp_p(y) = b_y - log total, lp_other(y) = lp_p(y) + x_y - L
    lp_p = b.gather(-1, y).squeeze(-1) - log_total
    lp_o = lp_p + x.gather(-1, y).squeeze(-1) - lg
    s_lab, t_lab = (lp_o, lp_p) if divergence == "fkl" else (lp_p, lp_o)
    d, gap = d.float(), gap.float()
    values = torch.stack((lse_s, lse_t, *(v.double() for v in (
        d, torch.zeros_like(d), s_lab.float(), t_lab.float(), gap))))
    ok = near & d.isfinite() & gap.isfinite() & lse_p.isfinite()
    return (torch.where(keep, values, 0.0), torch.where(keep.unsqueeze(-1), g, 0.0),
            ok | ~keep)


