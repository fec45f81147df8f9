"""The two passes of the Triton kernels in PyTorch, over blocks of rows (the CPU path).

``impl="torch"``: the same stats and gradient passes as ``unisd_fast.kernels``, behind the
same ``RowBackend`` interface (``backend.py``), but each pass works on a block of rows at a
time, so no float32 tokens x vocab temporary is alive beyond one block (about
``CHUNK_ELEMENTS`` elements; compiled, none but two in the jsd stats pass: the compiler fuses
each pass into one loop) and the gradient itself. The per-block math follows docs/losses.md
("Accuracy when the student is close to the teacher") and is compiled with ``torch.compile``
where the compiler works; ``UNISD_FAST_COMPILE=0`` runs it eagerly. Inputs of at most
``SMALL_ELEMENTS`` logits that need a gradient take one call instead (``row_stats_and_grad``).
docs/kernels.md describes the passes.

Compile state lives in a ``TorchBackend`` instance. Run-time scalars (tau, alpha) enter the
compiled functions as 0-dim tensors and each divergence has its own function, so a process
compiles at most one graph per (function, dtype, vocabulary size) and never recompiles for a
new temperature or mixing weight.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .backend import RowStats
from .stable import (
    expm1_minus_x_series,
    jsd_remainder,
    log1p_alpha_expm1,
    shifted_finish,
    shifted_kl,
    shifted_terms,
)

CHUNK_ELEMENTS = 1 << 24
CHUNK_ELEMENTS_EAGER = 1 << 22
COMPILE_MIN_ELEMENTS = 1 << 12
# Up to this many logits the forward also computes the divergence gradient (one compiled call
# instead of two, the backward a scaling): below it the per-call overhead, not the logits
# traffic, sets the time, and the extra float32 tokens x vocab tensor is at most 4 MiB.
SMALL_ELEMENTS = 1 << 20
# Up to this many columns the small-input pass sums in float32 (a compiled float32 sum of
# 4096 terms stays within a few ulps; over 32k it drifts), beyond it in float64.
FLOAT32_SUM_COLUMNS = 4096
SCALAR_CACHE_SIZE = 64
# Inductor stores a pointwise result of more than 30 ops that feeds a reduction as a
# block-sized buffer and reads it back (its default realize_opcount_threshold); the shifted
# sums of the stats pass are such results. Fused in the reduction loop instead, a stats pass
# over a 55 x 152k block takes 17 ms instead of 30 ms and allocates no block-sized buffer.
INDUCTOR_OPTIONS = {"realize_opcount_threshold": 1000}
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
#   jsd: r = lp_T - lp_S = gap - dx; KL(p_T||M) = (1-a) D_fkl - sum p_T q(-r; 1-a),
#        KL(p_S||M) = a D_rkl - sum p_S q(r; a), D = a KL(p_T||M) + (1-a) KL(p_S||M).
# Rows with a one-sided -inf column, whose shifted sums overflow, or whose shifted mean
# E[e^x] is below 1/2 (student far from teacher, D not small) use the textbook forms.
# Returns the (7, rows) stack of (lse_S, lse_T, D, aux, lp_S(y), lp_T(y), lse_S - lse_T),
# zero on rows where ``keep`` is False (ignored labels).
def _stats(z, u, y, keep, tau, alpha, divergence: str):
    y = torch.where(keep, y, 0).long()
    zf = z.float()
    uf = u.float()
    s = zf / tau
    t = uf / tau
    both, one = _columns(zf, uf)
    lse_s = _logsumexp(s)
    lse_t = _logsumexp(t)
    lp_s = s - lse_s
    lp_t = t - lse_t
    p_s = lp_s.exp()
    p_t = lp_t.exp()
    dx = torch.where(both | one, 0.0, (zf - uf) / tau)
    base = s if divergence == "rkl" else t
    peak = base == base.amax(-1, keepdim=True)
    mu = torch.where(peak, dx, 0.0).sum(-1, keepdim=True) / peak.sum(-1, keepdim=True)
    mu = torch.where(mu.isfinite(), mu, 0.0)
    x = dx - mu
    classic_gap = (lse_s - lse_t).squeeze(-1)
    ok = ~one.any(-1)
    zeros = torch.zeros_like(classic_gap)
    if divergence == "rkl":
        d_r, lg, near = shifted_kl(p_s, -x, t + mu - lse_s)
        ok = ok & near & d_r.isfinite()
        gap = (mu.squeeze(-1) - lg)
        classic = _xlogy_sum(p_s, lp_s - lp_t)
        d = torch.where(ok, d_r, classic)
        aux = zeros
    else:
        d_f, lg, near = shifted_kl(p_t, x, s - mu - lse_t)
        ok = ok & near & d_f.isfinite()
        gap = lg + mu.squeeze(-1)
        if divergence == "fkl":
            d = torch.where(ok, d_f, _xlogy_sum(p_t, lp_t - lp_s))
            aux = zeros
        else:
            d_r, _, near = shifted_kl(p_s, -x, t + mu - lse_s)
            ok = ok & near & d_r.isfinite()
            log_a = torch.log(alpha)
            log_1ma = torch.log1p(-alpha)
            r = torch.where(ok, gap, classic_gap).unsqueeze(-1) - dx
            kl_tm = (1 - alpha) * d_f - _xlogy_sum(p_t, jsd_remainder(-r, log_1ma, log_a))
            kl_sm = alpha * d_r - _xlogy_sum(p_s, jsd_remainder(r, log_a, log_1ma))
            log_m = torch.logaddexp(lp_s + log_1ma, lp_t + log_a)
            kl_tm = torch.where(ok, kl_tm, _xlogy_sum(p_t, lp_t - log_m))
            kl_sm = torch.where(ok, kl_sm, _xlogy_sum(p_s, lp_s - log_m))
            d = alpha * kl_tm + (1 - alpha) * kl_sm
            aux = kl_sm
    gap = torch.where(ok, gap, classic_gap)
    s_lab = lp_s.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    t_lab = lp_t.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    values = torch.stack((lse_s.squeeze(-1), lse_t.squeeze(-1), d, aux, s_lab, t_lab, gap))
    return torch.where(keep, values, 0.0)


def _stats_fkl(z, u, y, keep, tau, alpha):
    return _stats(z, u, y, keep, tau, alpha, "fkl")


def _stats_rkl(z, u, y, keep, tau, alpha):
    return _stats(z, u, y, keep, tau, alpha, "rkl")


def _stats_jsd(z, u, y, keep, tau, alpha):
    return _stats(z, u, y, keep, tau, alpha, "jsd")


# log_softmax(x / tau)[y] of one block, 0 where ``keep`` is False; NaN where the log-sum-exp
# is not finite (a row holding +inf), as in the reference. The label is read from x itself,
# not from a log_softmax result, which the compiler would store as a block-sized buffer.
def _label_block(x, y, keep, tau):
    y = torch.where(keep, y, 0).long()
    s = x.float() / tau
    lse = _logsumexp(s)
    value = torch.where(lse.isfinite(), s.gather(-1, y.unsqueeze(-1)) - lse, float("nan"))
    return torch.where(keep, value.squeeze(-1), 0.0)


def label_logprobs_small(x, yy, keep, tau):
    """log softmax(x / tau) at the labels ``yy`` (..., 1; valid on every row), 0 where
    ``keep`` is False: ATen's log_softmax, for small inputs (a full-size temporary)."""
    lp = torch.log_softmax(x.float() / tau, -1).gather(-1, yy).squeeze(-1)
    return torch.where(keep, lp, 0.0)


# Gradient of one block, written into out:
#   dz = (ck * G + cc * (onehot(y) - p_S)) / tau, and 0 on rows with ck = cc = 0, with
#   r = lp_T - lp_S = (u - z) / tau + (lse_S - lse_T) formed without cancellation and
#   fkl: G = p_S - p_T = p_T expm1(-r)       (p_S - p_T directly where |r| >= 0.5)
#   rkl: G = p_S (-r - D)
#   jsd: G = (1-a) p_S (-log1p(a expm1(r)) - AUX)
# Columns where both sides are -inf get 0; one-sided -inf columns use r = lp_T - lp_S.
# _divergence_grad returns (G, p_S).
def _divergence_grad(z, u, lse_s, lse_t, gap, d, aux, tau, alpha, divergence: str):
    zf = z.float()
    uf = u.float()
    both, one = _columns(zf, uf)
    lp_s = zf / tau - lse_s.unsqueeze(-1)
    lp_t = uf / tau - lse_t.unsqueeze(-1)
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
        lms = log1p_alpha_expm1(r, torch.log(alpha), torch.log1p(-alpha))
        g_div = (1 - alpha) * _xlogy_terms(p_s, -lms - aux.unsqueeze(-1))
    return g_div, p_s


def _grad(out, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha, divergence: str):
    g_div, p_s = _divergence_grad(z, u, lse_s, lse_t, gap, d, aux, tau, alpha, divergence)
    cols = torch.arange(z.shape[-1], device=z.device)
    onehot = (cols == y.unsqueeze(-1)).float()
    g = (ck.unsqueeze(-1) * g_div + cc.unsqueeze(-1) * (onehot - p_s)) / tau
    active = ((ck != 0) | (cc != 0)).unsqueeze(-1)
    out.copy_(torch.where(active, g, 0.0))


# The small-input pass: the stats of _stats and, from them in the same call, G / tau of
# _divergence_grad (0 on ignored rows), which the backward scales by ck (see row_stats_and_grad).
def _stats_grad(z, u, y, keep, tau, alpha, divergence: str):
    stats = _stats(z, u, y, keep, tau, alpha, divergence)
    lse_s, lse_t, d, aux, _, _, gap = stats.unbind(0)
    g_div, _ = _divergence_grad(z, u, lse_s, lse_t, gap, d, aux, tau, alpha, divergence)
    return stats, torch.where(keep.unsqueeze(-1), g_div / tau, 0.0)


# The small-input pass of fkl and rkl on rows of finite logits: three reads of the logits,
# two exponentials per column. With p the teacher's distribution (fkl; the student's for
# rkl), w = exp(b) = p * total its unnormalised weights, b = (base - max base) / tau (the
# difference formed first, so that logits / tau of size 1000 cost no digits of p), and dx
# the other side's log-ratio over it ((z - u) / tau for fkl, (u - z) / tau for rkl):
#   read 1: max base;  read 2: w, total = sum w and mu = sum w dx / total, the p-mean of dx;
#   read 3: x = dx - mu has E_p[x] ~ 0, so E_p[e^x] >= 1 (Jensen) and the shifted sums never
#   need the textbook fallback of _stats: a, b = sum (w x, w (e^x - 1 - x)) / total, and
#   D, L = shifted_finish(a, b); the other side's log-sum-exp is lse_p + mu + L.
# With e = x - L (lp_other - lp_p), the gradient is formed from the stored w, w expm1(x)
# (shifted_terms) or x and per-row factors, with no transcendental per column:
#   fkl: G = p_S - p_T = p expm1(e) = (e^-L w expm1(x) + (e^-L - 1) w) / total,
#   rkl: G = p_S (lp_S - lp_T - D) = -p (e + D) = -p (x - a).
# The column sums run in float32 up to FLOAT32_SUM_COLUMNS columns (in float64 beyond), the
# per-row values in float64 (where e^-L - 1 is exact far beyond float32).
# Returns _stats_grad's pair and a per-row ok flag: False on a kept row where anything is
# not finite (a non-finite or -inf input), whose block the caller runs through _stats_grad.
def _stats_grad_shifted(z, u, y, keep, tau, divergence: str):
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
    lse_p = m.squeeze(-1) * inv + log_total
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
    lse_s, lse_t, d, gap = lse_s.float(), lse_t.float(), d.float(), gap.float()
    values = torch.stack((lse_s, lse_t, d, torch.zeros_like(d), s_lab.float(), t_lab.float(),
                          gap))
    ok = near & d.isfinite() & gap.isfinite() & lse_p.isfinite()
    return (torch.where(keep, values, 0.0), torch.where(keep.unsqueeze(-1), g, 0.0),
            ok | ~keep)


def _stats_grad_shifted_fkl(z, u, y, keep, tau, alpha):
    return _stats_grad_shifted(z, u, y, keep, tau, "fkl")


def _stats_grad_shifted_rkl(z, u, y, keep, tau, alpha):
    return _stats_grad_shifted(z, u, y, keep, tau, "rkl")


def _stats_grad_fkl(z, u, y, keep, tau, alpha):
    return _stats_grad(z, u, y, keep, tau, alpha, "fkl")


def _stats_grad_rkl(z, u, y, keep, tau, alpha):
    return _stats_grad(z, u, y, keep, tau, alpha, "rkl")


def _stats_grad_jsd(z, u, y, keep, tau, alpha):
    return _stats_grad(z, u, y, keep, tau, alpha, "jsd")


def _grad_fkl(out, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha):
    _grad(out, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha, "fkl")


def _grad_rkl(out, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha):
    _grad(out, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha, "rkl")


def _grad_jsd(out, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha):
    _grad(out, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha, "jsd")


# The gradient written over z itself (inplace_backward, the fused-linear chunks) or over u
# (the fused-linear chunks with a soft-cap). Separate functions, so that a compiled graph is
# never handed one tensor twice, once mutated: torch.compile turns such aliased inputs into
# a "synthetic base" whose cached graphs fail when the base's size changes between processes.
def _grad_into_z_fkl(z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha):
    _grad(z, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha, "fkl")


def _grad_into_z_rkl(z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha):
    _grad(z, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha, "rkl")


def _grad_into_z_jsd(z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha):
    _grad(z, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha, "jsd")


def _grad_into_u_fkl(z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha):
    _grad(u, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha, "fkl")


def _grad_into_u_rkl(z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha):
    _grad(u, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha, "rkl")


def _grad_into_u_jsd(z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha):
    _grad(u, z, u, y, lse_s, lse_t, gap, d, aux, ck, cc, tau, alpha, "jsd")


STATS = {"fkl": _stats_fkl, "rkl": _stats_rkl, "jsd": _stats_jsd}
STATS_GRADS = {"fkl": _stats_grad_fkl, "rkl": _stats_grad_rkl, "jsd": _stats_grad_jsd}
STATS_GRADS_SHIFTED = {"fkl": _stats_grad_shifted_fkl, "rkl": _stats_grad_shifted_rkl}
GRADS = {"fkl": _grad_fkl, "rkl": _grad_rkl, "jsd": _grad_jsd}
GRADS_INTO_Z = {"fkl": _grad_into_z_fkl, "rkl": _grad_into_z_rkl, "jsd": _grad_into_z_jsd}
GRADS_INTO_U = {"fkl": _grad_into_u_fkl, "rkl": _grad_into_u_rkl, "jsd": _grad_into_u_jsd}
BLOCK_FUNCTIONS = (*STATS.values(), *STATS_GRADS.values(), *STATS_GRADS_SHIFTED.values(),
                   *GRADS.values(),
                   *GRADS_INTO_Z.values(), *GRADS_INTO_U.values(), _label_block)


def _same_view(a, b) -> bool:
    """Whether a and b are the same elements of the same memory."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class Rows:
    """A (B, T, ...) tensor seen as N = B * T rows: ``block(r0, r1)`` gives rows r0:r1 as a
    2-D (or 1-D) tensor, a view when the layout allows and a block-sized copy otherwise;
    ``write(r0, r1, value)`` stores into those rows."""

    def __init__(self, x):
        self.x = x
        self.T = x.shape[1]
        try:
            self.flat = x.view(-1, *x.shape[2:])
        except RuntimeError:
            self.flat = None

    def _index(self, r0, r1):
        r = torch.arange(r0, r1, device=self.x.device)
        return r // self.T, r % self.T

    def block(self, r0: int, r1: int):
        if self.flat is not None:
            return self.flat[r0:r1]
        return self.x[self._index(r0, r1)]

    def write(self, r0: int, r1: int, value):
        if self.flat is not None:
            self.flat[r0:r1] = value
        else:
            self.x[self._index(r0, r1)] = value


class TorchBackend:
    """The CPU ``RowBackend``: per-block passes, compiled per instance.

    ``compile=None`` reads ``UNISD_FAST_COMPILE`` (default on); ``compiler`` is the
    ``torch.compile`` backend. A compiler that fails at run time turns this instance eager
    for good, with one ``RuntimeWarning``.
    """

    def __init__(self, compile: bool | None = None, compiler="inductor"):
        if compile is None:
            compile = os.environ.get("UNISD_FAST_COMPILE", "1") != "0"
        self.compiled: dict = {}
        self.scalars: dict = {}
        self.compile_args = {"backend": compiler,
                             "options": INDUCTOR_OPTIONS if compiler == "inductor" else None}
        if compile:
            try:
                self.compiled = {fn: torch.compile(fn, **self.compile_args)
                                 for fn in BLOCK_FUNCTIONS}
            except Exception:  # noqa: BLE001 - no working compiler: stay eager
                self.compiled = {}

    @property
    def is_compiled(self) -> bool:
        return bool(self.compiled)

    def row_ranges(self, n: int, vocab: int):
        """[r0, r1) ranges of about CHUNK_ELEMENTS (CHUNK_ELEMENTS_EAGER uncompiled)."""
        budget = CHUNK_ELEMENTS if self.is_compiled else CHUNK_ELEMENTS_EAGER
        rows = max(1, budget // vocab)
        return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]

    def _run(self, fn, *args, mark_rows=True):
        """fn on 2-D row blocks, compiled with a dynamic row count where possible (rows marked
        dynamic unless ``mark_rows`` is False: then dynamo makes a size dynamic when it first
        changes, one recompile). A compiling instance compiles a function beyond
        BLOCK_FUNCTIONS on its first call (the whole-loss functions of small.py). Blocks under
        COMPILE_MIN_ELEMENTS run eagerly: there compiling costs more than it saves."""
        compiled = self.compiled.get(fn)
        if compiled is None and self.compiled:
            compiled = self.compiled[fn] = torch.compile(fn, **self.compile_args)
        if compiled is None or args[0].numel() < COMPILE_MIN_ELEMENTS:
            return fn(*args)
        for a in args if mark_rows else ():
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 - a compiler failing at run time: go eager
            warnings.warn(f"unisd_fast: torch.compile failed ({type(error).__name__}: "
                          f"{error}); the CPU path runs eagerly from now on", RuntimeWarning,
                          stacklevel=3)
            self.compiled = {}
            return fn(*args)

    def _scalar(self, value: float, like: torch.Tensor):
        """``value`` as a 0-dim float32 tensor on ``like``'s device, made once per value."""
        key = (value, like.device)
        out = self.scalars.get(key)
        if out is None:
            if len(self.scalars) >= SCALAR_CACHE_SIZE:
                self.scalars.clear()
            out = self.scalars[key] = torch.tensor(value, dtype=torch.float32,
                                                   device=like.device)
        return out

    def _blocks(self, fn, n: int, vocab: int, out_shape, dtype, device):
        """Run ``fn(r0, r1)`` over the row ranges: a single block returns its own result,
        several write into one (..., n) float32 tensor."""
        ranges = self.row_ranges(n, vocab)
        if len(ranges) == 1:
            return fn(0, n)
        out = torch.empty(out_shape, dtype=dtype, device=device)
        for r0, r1 in ranges:
            out[..., r0:r1] = fn(r0, r1)
        return out

    def row_stats(self, z, u, labels, *, divergence: str, tau: float, alpha: float,
                  ignore_index: int) -> RowStats:
        """Per-row (lse_S, lse_T, D, aux, s_y, t_y, lse_S - lse_T), float32 (B, T) each."""
        B, T, V = z.shape
        zr, ur, yr = Rows(z), Rows(u), Rows(labels)
        tau_t, alpha_t = self._scalar(tau, z), self._scalar(alpha, z)
        stats = STATS[divergence]

        def block(r0, r1):
            y = yr.block(r0, r1)
            return self._run(stats, zr.block(r0, r1), ur.block(r0, r1), y, y != ignore_index,
                             tau_t, alpha_t)

        outs = self._blocks(block, B * T, V, (7, B * T), torch.float32, z.device)
        return RowStats(*outs.view(7, B, T).unbind(0))

    def row_stats_and_grad(self, z, u, labels, *, divergence: str, tau: float, alpha: float,
                           ignore_index: int):
        """For inputs of at most SMALL_ELEMENTS logits: ``row_stats`` and, from the same call,
        the float32 (B, T, V) gradient of each row's divergence over tau, d D / d z (0 on
        ignored rows), and whether that gradient is known to be finite. None for larger inputs
        (use ``row_stats`` and ``write_grad``). On CPU, fkl and rkl take the mean-shifted pass,
        whose gradient is finite, and the general one only when a kept row holds a non-finite
        value (its flag is read on the host: free on CPU, a sync on a GPU)."""
        B, T, V = z.shape
        n = B * T
        if n * V > SMALL_ELEMENTS:
            return None
        y = labels.reshape(n)
        args = (z.reshape(n, V), u.reshape(n, V), y, y != ignore_index, self._scalar(tau, z),
                self._scalar(alpha, z))
        shifted = STATS_GRADS_SHIFTED.get(divergence) if z.device.type == "cpu" else None
        finite = False
        if shifted is not None:
            stats, grad, ok = self._run(shifted, *args)
            finite = bool(ok.all())
        if not finite:
            stats, grad = self._run(STATS_GRADS[divergence], *args)
        return RowStats(*stats.view(7, B, T).unbind(0)), grad.view(B, T, V), finite

    def label_logprob(self, x, labels, *, tau: float, ignore_index: int):
        """log softmax(x / tau)[labels] per row as float32 (B, T); 0 on ignored rows. CPU
        inputs of at most SMALL_ELEMENTS logits take ATen's log_softmax, which at that size
        is about twice as fast as a compiled call."""
        if x.device.type == "cpu" and x.numel() <= SMALL_ELEMENTS:
            keep = labels != ignore_index
            return label_logprobs_small(x, torch.where(keep, labels, 0).long().unsqueeze(-1),
                                        keep, tau)
        B, T, V = x.shape
        xr, yr = Rows(x), Rows(labels)
        tau_t = self._scalar(tau, x)

        def block(r0, r1):
            y = yr.block(r0, r1)
            return self._run(_label_block, xr.block(r0, r1), y, y != ignore_index, tau_t)

        return self._blocks(block, B * T, V, (B * T,), torch.float32, x.device).view(B, T)

    def write_grad(self, z, u, labels, out, stats: RowStats, ck, cc, *, divergence: str,
                   tau: float, alpha: float) -> None:
        """Write d loss / d z into ``out`` (may be ``z`` itself) from the row stats and the
        coefficients. Rows with ck = cc = 0 (ignored, or clipped without hinge) are written
        as zeros, so non-finite values there never reach the gradient."""
        B, T, V = z.shape
        zr, ur, yr, outr = Rows(z), Rows(u), Rows(labels), Rows(out)
        rows = [t.reshape(-1) for t in (stats.lse_s, stats.lse_t, stats.lse_gap,
                                        stats.divergence, stats.aux, ck, cc)]
        tau_t, alpha_t = self._scalar(tau, z), self._scalar(alpha, z)
        for r0, r1 in self.row_ranges(B * T, V):
            block = outr.flat[r0:r1] if outr.flat is not None else torch.empty(
                (r1 - r0, V), dtype=out.dtype, device=out.device)
            zb, ub = zr.block(r0, r1), ur.block(r0, r1)
            rest = (yr.block(r0, r1), *(t[r0:r1] for t in rows), tau_t, alpha_t)
            if _same_view(block, zb):
                self._run(GRADS_INTO_Z[divergence], zb, ub, *rest)
            elif _same_view(block, ub):
                self._run(GRADS_INTO_U[divergence], zb, ub, *rest)
            else:
                self._run(GRADS[divergence], block, zb, ub, *rest)
            if outr.flat is None:
                outr.write(r0, r1, block)


@functools.cache
def default_backend() -> TorchBackend:
    """The process's shared ``TorchBackend`` (created on first use)."""
    return TorchBackend()
