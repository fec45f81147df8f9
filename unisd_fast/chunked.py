"""The two-pass algorithm of the Triton kernels in PyTorch, chunked over rows.

This is the CPU path (``impl="torch"``): the same stats and gradient passes as
``unisd_fast.kernels`` with the same signatures, but each pass works on a block of rows at a
time, so no float32 tokens x vocab temporary is alive beyond one block (about
``CHUNK_ELEMENTS`` elements) and the gradient itself.
"""

from __future__ import annotations

import math

import torch

CHUNK_ELEMENTS = 1 << 21


def row_blocks(B: int, T: int, V: int):
    """Slices (batch, time) covering a (B, T) grid in blocks of about CHUNK_ELEMENTS / V rows."""
    rows = max(1, CHUNK_ELEMENTS // V)
    if rows >= T:
        step = max(1, rows // T)
        for b0 in range(0, B, step):
            yield slice(b0, min(B, b0 + step)), slice(0, T)
    else:
        for b in range(B):
            for t0 in range(0, T, rows):
                yield slice(b, b + 1), slice(t0, min(T, t0 + rows))


def _log_m(lp_s, lp_t, alpha):
    return torch.logaddexp(lp_s + math.log(1 - alpha), lp_t + math.log(alpha))


def row_stats(z, u, labels, *, divergence: str, tau: float, alpha: float, ignore_index: int):
    """Per-row (lse_S, lse_T, D, aux, s_y, t_y), each a float32 (B, T) tensor."""
    B, T, V = z.shape
    outs = [torch.zeros((B, T), dtype=torch.float32, device=z.device) for _ in range(6)]
    lse_s_all, lse_t_all, d_all, aux_all, s_lab_all, t_lab_all = outs
    for bs, ts in row_blocks(B, T, V):
        y = labels[bs, ts]
        keep = y != ignore_index
        safe_y = torch.where(keep, y, 0).unsqueeze(-1)
        lp_s = z[bs, ts].float().div_(tau)
        lse_s = torch.logsumexp(lp_s, dim=-1, keepdim=True)
        lp_s.sub_(lse_s)
        lp_t = u[bs, ts].float().div_(tau)
        lse_t = torch.logsumexp(lp_t, dim=-1, keepdim=True)
        lp_t.sub_(lse_t)
        if divergence == "fkl":
            d = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
            aux = torch.zeros_like(d)
        elif divergence == "rkl":
            d = (lp_s.exp() * (lp_s - lp_t)).sum(-1)
            aux = torch.zeros_like(d)
        else:
            log_m = _log_m(lp_s, lp_t, alpha)
            kl_tm = (lp_t.exp() * (lp_t - log_m)).sum(-1)
            aux = (lp_s.exp() * (lp_s - log_m)).sum(-1)
            d = alpha * kl_tm + (1 - alpha) * aux
        values = (
            lse_s.squeeze(-1), lse_t.squeeze(-1), d, aux,
            lp_s.gather(-1, safe_y).squeeze(-1), lp_t.gather(-1, safe_y).squeeze(-1),
        )
        for out, value in zip(outs, values, strict=True):
            out[bs, ts] = torch.where(keep, value, 0.0)
    return lse_s_all, lse_t_all, d_all, aux_all, s_lab_all, t_lab_all


def label_logprob(x, labels, *, tau: float, ignore_index: int):
    """log softmax(x / tau)[labels] per row as float32 (B, T); 0 on ignored rows."""
    B, T, V = x.shape
    out = torch.zeros((B, T), dtype=torch.float32, device=x.device)
    for bs, ts in row_blocks(B, T, V):
        y = labels[bs, ts]
        keep = y != ignore_index
        xs = x[bs, ts].float().div_(tau)
        picked = xs.gather(-1, torch.where(keep, y, 0).unsqueeze(-1)).squeeze(-1)
        out[bs, ts] = torch.where(keep, picked - torch.logsumexp(xs, dim=-1), 0.0)
    return out


def write_grad(z, u, labels, out, stats, ck, cc, *, divergence: str, tau: float, alpha: float):
    """Write d loss / d z into ``out`` (may be ``z`` itself) from row stats and coefficients.

    Same formula as ``unisd_fast.kernels.grad``; rows with ck = cc = 0 are written as zeros
    without reading their logits, so non-finite values there never reach the gradient.
    """
    B, T, V = z.shape
    lse_s_all, lse_t_all, d_all, aux_all = stats
    for bs, ts in row_blocks(B, T, V):
        ck_b = ck[bs, ts].unsqueeze(-1)
        cc_b = cc[bs, ts].unsqueeze(-1)
        active = (ck_b != 0) | (cc_b != 0)
        lp_s = z[bs, ts].float().div_(tau).sub_(lse_s_all[bs, ts].unsqueeze(-1))
        p_s = lp_s.exp()
        lp_t = u[bs, ts].float().div_(tau).sub_(lse_t_all[bs, ts].unsqueeze(-1))
        if divergence == "fkl":
            g = p_s - lp_t.exp_()
        elif divergence == "rkl":
            g = p_s * (lp_s - lp_t - d_all[bs, ts].unsqueeze(-1))
        else:
            log_m = _log_m(lp_s, lp_t, alpha)
            g = (1 - alpha) * p_s * (lp_s - log_m - aux_all[bs, ts].unsqueeze(-1))
        g.mul_(ck_b).sub_(p_s.mul_(cc_b))
        y = labels[bs, ts]
        onehot_rows = cc_b.squeeze(-1) != 0
        g.scatter_add_(-1, torch.where(onehot_rows, y, 0).unsqueeze(-1),
                       torch.where(onehot_rows, cc_b.squeeze(-1), 0.0).unsqueeze(-1))
        g.mul_(1.0 / tau)
        out[bs, ts] = torch.where(active, g, 0.0)
