"""The support passes of the PyTorch backend over blocks of rows (docs/losses.md, "Sparse
supports"): the student's log-sum-exp, its top-k (or a given support) and the log-probs
there, and the dense gradient write. The dense parts run through the backend's compiler."""

from __future__ import annotations

import torch

from ..support import SupportRows, topk_columns
from .rows import Rows

# Logits per row block of the support passes (the eager top-k and scatter make block-sized
# temporaries).
BLOCK_ELEMENTS = 1 << 22


def block_ranges(n: int, vocab: int):
    rows = max(1, BLOCK_ELEMENTS // vocab)
    return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


# lse = log sum exp(x / tau) per row, the sum in float64 (compiled into one loop), float64.
def row_lse(x, tau):
    s = x.float() / tau
    m = s.amax(-1, keepdim=True)
    m = torch.where(m.isfinite(), m, 0.0)
    total = torch.exp(s - m).sum(-1, dtype=torch.float64)
    return m.squeeze(-1).double() + total.log()


# The dense part of the gradient: -beta exp(z / tau - lse) / tau, 0 on rows with beta = 0.
def dense_grad(z, lse, beta, tau):
    p = torch.exp(z.float() / tau - lse.float().unsqueeze(-1))
    g = p * (-beta.float() / tau).unsqueeze(-1)
    return torch.where((beta != 0).unsqueeze(-1), g, 0.0)


def _at(x, index, lse, tau):
    """log softmax(x / tau) at the columns ``index`` (float64), x / tau rounded to float32
    as in ``row_lse``."""
    return (x.gather(-1, index).float() / tau).double() - lse.unsqueeze(-1)


# Stats of one block of rows: lse_S = log sum exp(z / tau) (float64 sum); the support S =
# the given ``index`` or the top-k of z (``support.topk_columns``); log p_S(j) = z_j / tau -
# lse_S in float64 for j in S and at the label; with a teacher u (top-k support), lse_T
# likewise and log p_T at S and at the label.
def support_block(compiler, z, u, y, keep, index, k: int, tau: float) -> SupportRows:
    y = torch.where(keep, y, 0).long().unsqueeze(-1)
    tau_t = compiler.scalar(tau, z)
    lse_s = compiler.run(row_lse, z, tau_t)
    if index is None:
        index = topk_columns(z, None, k)
    row = keep.unsqueeze(-1)
    index = torch.where(row, index.long(), torch.arange(index.shape[1], device=z.device))
    lp_s = _at(z, index, lse_s, tau)
    s_lab = _at(z, y, lse_s, tau).squeeze(-1)
    lp_t, t_lab = None, torch.zeros_like(s_lab)
    if u is not None:
        lse_t = compiler.run(row_lse, u, tau_t)
        lp_t = torch.where(row, _at(u, index, lse_t, tau), 0.0)
        t_lab = _at(u, y, lse_t, tau).squeeze(-1)
    return SupportRows(torch.where(keep, lse_s, 0.0), index, torch.where(row, lp_s, 0.0), lp_t,
                       torch.where(keep, s_lab, 0.0).float(),
                       torch.where(keep, t_lab, 0.0).float())


def support_stats(compiler, z, u, labels, index, *, k: int, tau: float,
                  ignore_index: int) -> SupportRows:
    """``support_block`` over row blocks of (B, T, V) logits (u None for a given support
    ``index`` (B, T, k)); SupportRows of the N = B * T rows."""
    zr, yr = Rows(z), Rows(labels)
    ur = None if u is None else Rows(u)
    ir = None if index is None else Rows(index)
    parts = []
    for r0, r1 in block_ranges(labels.numel(), z.shape[-1]):
        y = yr.block(r0, r1)
        parts.append(support_block(compiler, zr.block(r0, r1),
                                   None if ur is None else ur.block(r0, r1), y,
                                   y != ignore_index,
                                   None if ir is None else ir.block(r0, r1), k, tau))
    if len(parts) == 1:
        return parts[0]
    return SupportRows(*(None if p[0] is None else torch.cat(p)
                         for p in zip(*parts, strict=True)))


# Gradient of the loss over a support, written into out: with p_S = exp(z / tau - lse_S),
#   dz = (scatter_S(coef) + scatter_y(cc) - beta p_S) / tau,
# coef = d loss / d log p_S on the support, beta = sum coef + cc (ops/sparse.py): the
# compiled dense part, then the k + 1 scattered entries per row.
def support_grad(compiler, z, out, rows: SupportRows, beta, coef, labels, cc, *,
                 tau: float) -> None:
    zr, outr, yr = Rows(z), Rows(out), Rows(labels)
    tau_t = compiler.scalar(tau, z)
    for r0, r1 in block_ranges(labels.numel(), z.shape[-1]):
        g = compiler.run(dense_grad, zr.block(r0, r1), rows.lse_s[r0:r1], beta[r0:r1], tau_t)
        g.scatter_add_(-1, rows.index[r0:r1], (coef[r0:r1] / tau).float())
        c = cc[r0:r1]
        y = torch.where(c != 0, yr.block(r0, r1), 0).long().unsqueeze(-1)
        g.scatter_add_(-1, y, (c / tau).float().unsqueeze(-1))
        if outr.flat is not None:
            outr.flat[r0:r1] = g
        else:
            outr.write(r0, r1, g)
