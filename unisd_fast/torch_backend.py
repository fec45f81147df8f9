"""The two passes of the Triton kernels in PyTorch, over blocks of rows (the CPU path).

``impl="torch"``: the same stats and gradient passes as ``unisd_fast.kernels``, behind the
same ``RowBackend`` interface (``backend.py``), but each pass works on a block of rows at a
time, so no float32 tokens x vocab temporary is alive beyond one block (about
``CHUNK_ELEMENTS`` elements, none at all when compiled: the compiler fuses each pass into one
loop) and the gradient itself. The per-block math is compiled with ``torch.compile`` where
the compiler works; set ``UNISD_FAST_COMPILE=0`` to run it eagerly.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from .backend import RowStats

CHUNK_ELEMENTS = 1 << 24
CHUNK_ELEMENTS_EAGER = 1 << 22
COMPILE_MIN_ELEMENTS = 1 << 18


def _log_m(lp_s, lp_t, alpha: float):
    return torch.logaddexp(lp_s + math.log(1 - alpha), lp_t + math.log(alpha))


# Stats of one block: lse_S, lse_T, D (fkl, rkl or jsd), aux = KL(p_S||M) for jsd, and the
# label log-probs s_y - lse_S, t_y - lse_T, with s = z / tau and t = u / tau.
def _stats_block(z, u, y, tau: float, divergence: str, alpha: float):
    s = z.float() / tau
    t = u.float() / tau
    lse_s = torch.logsumexp(s, dim=-1, keepdim=True)
    lse_t = torch.logsumexp(t, dim=-1, keepdim=True)
    lp_s = s - lse_s
    lp_t = t - lse_t
    if divergence == "fkl":
        d = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
        aux = torch.zeros_like(d)
    elif divergence == "rkl":
        d = (lp_s.exp() * (lp_s - lp_t)).sum(-1)
        aux = torch.zeros_like(d)
    else:
        log_m = _log_m(lp_s, lp_t, alpha)
        aux = (lp_s.exp() * (lp_s - log_m)).sum(-1)
        d = alpha * (lp_t.exp() * (lp_t - log_m)).sum(-1) + (1 - alpha) * aux
    s_lab = lp_s.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    t_lab = lp_t.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return lse_s.squeeze(-1), lse_t.squeeze(-1), d, aux, s_lab, t_lab


# log_softmax(x / tau)[y] of one block; NaN on a row holding +inf, as in the reference.
def _label_block(x, y, tau: float):
    return torch.log_softmax(x.float() / tau, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


# Gradient of one block, the formula of unisd_fast.kernels.grad, written into out:
#   dz = (ck * g_div + cc * (onehot(y) - p_S)) / tau, and 0 on rows with ck = cc = 0.
def _grad_block(out, z, u, y, lse_s, lse_t, d, aux, ck, cc, tau: float, divergence: str,
                alpha: float):
    lp_s = z.float() / tau - lse_s.unsqueeze(-1)
    lp_t = u.float() / tau - lse_t.unsqueeze(-1)
    p_s = lp_s.exp()
    if divergence == "fkl":
        g_div = p_s - lp_t.exp()
    elif divergence == "rkl":
        g_div = p_s * (lp_s - lp_t - d.unsqueeze(-1))
    else:
        g_div = (1 - alpha) * p_s * (lp_s - _log_m(lp_s, lp_t, alpha) - aux.unsqueeze(-1))
    cols = torch.arange(z.shape[-1], device=z.device)
    onehot = (cols == y.unsqueeze(-1)).float()
    g = (ck.unsqueeze(-1) * g_div + cc.unsqueeze(-1) * (onehot - p_s)) / tau
    active = ((ck != 0) | (cc != 0)).unsqueeze(-1)
    out.copy_(torch.where(active, g, 0.0))


def _compiled(fn):
    if os.environ.get("UNISD_FAST_COMPILE", "1") == "0":
        return None
    try:
        return torch.compile(fn)
    except Exception:  # noqa: BLE001 - no working compiler: stay eager
        return None


_COMPILED = {fn: _compiled(fn) for fn in (_stats_block, _label_block, _grad_block)}


def _run(fn, *args):
    """fn on 2-D row blocks, compiled with a dynamic row count where possible. Blocks under
    COMPILE_MIN_ELEMENTS run eagerly: there the compile time outweighs what it saves."""
    compiled = _COMPILED[fn]
    if compiled is None or args[0].numel() < COMPILE_MIN_ELEMENTS:
        return fn(*args)
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(a, 0)
    try:
        return compiled(*args)
    except Exception as error:  # noqa: BLE001 - a compiler that fails at run time: go eager
        warnings.warn(f"unisd_fast: torch.compile failed ({type(error).__name__}: {error}); "
                      "the CPU path runs eagerly from now on", RuntimeWarning, stacklevel=2)
        for key in _COMPILED:
            _COMPILED[key] = None
        return fn(*args)


def row_ranges(N: int, V: int):
    """[r0, r1) ranges of about CHUNK_ELEMENTS (CHUNK_ELEMENTS_EAGER uncompiled) elements."""
    budget = CHUNK_ELEMENTS if _COMPILED[_grad_block] is not None else CHUNK_ELEMENTS_EAGER
    rows = max(1, budget // V)
    return [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]


class Rows:
    """Rows r0:r1 of a (B, T, ...) tensor as a 2-D (or 1-D) block: a view when the layout
    allows, else a block-sized copy."""

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

    def __getitem__(self, rng):
        r0, r1 = rng
        if self.flat is not None:
            return self.flat[r0:r1]
        return self.x[self._index(r0, r1)]

    def __setitem__(self, rng, value):
        r0, r1 = rng
        if self.flat is not None:
            self.flat[r0:r1] = value
        else:
            self.x[self._index(r0, r1)] = value


def row_stats(z, u, labels, *, divergence: str, tau: float, alpha: float, ignore_index: int):
    """Per-row (lse_S, lse_T, D, aux, s_y, t_y), each a float32 (B, T) tensor."""
    B, T, V = z.shape
    outs = torch.zeros((6, B * T), dtype=torch.float32, device=z.device)
    zr, ur, yr = Rows(z), Rows(u), Rows(labels)
    for rng in row_ranges(B * T, V):
        y = yr[rng]
        keep = y != ignore_index
        values = _run(_stats_block, zr[rng], ur[rng], torch.where(keep, y, 0).long(), tau,
                      divergence, alpha)
        outs[:, rng[0]:rng[1]] = torch.where(keep, torch.stack(values), 0.0)
    return RowStats(*outs.view(6, B, T).unbind(0))


def label_logprob(x, labels, *, tau: float, ignore_index: int):
    """log softmax(x / tau)[labels] per row as float32 (B, T); 0 on ignored rows."""
    B, T, V = x.shape
    out = torch.zeros(B * T, dtype=torch.float32, device=x.device)
    xr, yr = Rows(x), Rows(labels)
    for rng in row_ranges(B * T, V):
        y = yr[rng]
        keep = y != ignore_index
        value = _run(_label_block, xr[rng], torch.where(keep, y, 0).long(), tau)
        out[rng[0]:rng[1]] = torch.where(keep, value, 0.0)
    return out.view(B, T)


def write_grad(z, u, labels, out, stats, ck, cc, *, divergence: str, tau: float, alpha: float):
    """Write d loss / d z into ``out`` (may be ``z`` itself) from row stats and coefficients.

    Rows with ck = cc = 0 (ignored, or clipped without hinge) are written as zeros, so
    non-finite values there never reach the gradient.
    """
    B, T, V = z.shape
    zr, ur, yr, outr = Rows(z), Rows(u), Rows(labels), Rows(out)
    flat = [t.reshape(-1) for t in (*stats[:4], ck, cc)]
    for r0, r1 in row_ranges(B * T, V):
        lse_s, lse_t, d, aux, ck_b, cc_b = (t[r0:r1] for t in flat)
        block = outr.flat[r0:r1] if outr.flat is not None else torch.empty(
            (r1 - r0, V), dtype=out.dtype, device=out.device)
        _run(_grad_block, block, zr[r0, r1], ur[r0, r1], yr[r0, r1].long(), lse_s, lse_t, d,
             aux, ck_b, cc_b, tau, divergence, alpha)
        if outr.flat is None:
            outr[r0, r1] = block
