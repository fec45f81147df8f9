"""The support passes of the PyTorch backend over blocks of rows (docs/losses.md, "Sparse
supports"): the student's log-sum-exp, its top-k (or a given support) and the log-probs
there, and the dense gradient write."""

from __future__ import annotations

import torch

from ..support import SupportRows, tiled_topk
from .rows import Rows

# Columns per tile of the top-k sweep (its int64 keys are rows x tile).
TOPK_TILE = 4096


def _lse64(s: torch.Tensor) -> torch.Tensor:
    """log sum exp over the last dimension of float32 ``s``, the sum in float64, as float64."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(m.isfinite(), m, 0.0)
    total = torch.exp(s - m).sum(-1, dtype=torch.float64)
    return m.squeeze(-1).double() + total.log()


# Stats of one block of rows: lse_S = log sum exp(z / tau) (float64 sum); the support S =
# the given ``index`` or the top-k of z (``tiled_topk``); log p_S(j) = z_j / tau - lse_S in
# float64 (from the float32 z / tau the sum used) for j in S and at the label; with a
# teacher u (top-k support), lse_T likewise and log p_T at S and at the label.
def support_block(z, u, y, keep, index, k: int, tau: float) -> SupportRows:
    y = torch.where(keep, y, 0).long().unsqueeze(-1)
    s = z.float() / tau
    lse_s = _lse64(s)
    if index is None:
        index = tiled_topk(z, k, TOPK_TILE)
    index = torch.where(keep.unsqueeze(-1), index.long(), torch.arange(index.shape[1],
                                                                       device=z.device))
    lp_s = s.gather(-1, index).double() - lse_s.unsqueeze(-1)
    s_lab = s.gather(-1, y).squeeze(-1).double() - lse_s
    lp_t, t_lab = None, torch.zeros_like(s_lab)
    if u is not None:
        t = u.float() / tau
        lse_t = _lse64(t)
        lp_t = t.gather(-1, index).double() - lse_t.unsqueeze(-1)
        t_lab = t.gather(-1, y).squeeze(-1).double() - lse_t
    row = keep.unsqueeze(-1)
    return SupportRows(
        torch.where(keep, lse_s, 0.0), index, torch.where(row, lp_s, 0.0),
        None if lp_t is None else torch.where(row, lp_t, 0.0),
        torch.where(keep, s_lab, 0.0).float(), torch.where(keep, t_lab, 0.0).float())


# Gradient of one block, written into out: with p_S = exp(z / tau - lse_S),
#   dz = (scatter_S(coef) + scatter_y(cc) - beta p_S) / tau,
# coef = d loss / d log p_S on the support, beta = sum coef + cc (ops/sparse.py); 0 on rows
# with beta = 0 and coef = 0 (ignored or clipped rows).
def grad_block(out, z, lse_s, beta, index, coef, y, cc, tau: float) -> None:
    p = torch.exp(z.float() / tau - lse_s.float().unsqueeze(-1))
    active = ((beta != 0) | (coef != 0).any(-1) | (cc != 0)).unsqueeze(-1)
    g = torch.where(active, p * -beta.float().unsqueeze(-1), 0.0)
    g.scatter_add_(-1, index, coef.float())
    g.scatter_add_(-1, torch.where(cc != 0, y, 0).long().unsqueeze(-1),
                   cc.float().unsqueeze(-1))
    out.copy_(g.div_(tau))


def support_stats(ranges, z, u, labels, index, *, k: int, tau: float,
                  ignore_index: int) -> SupportRows:
    """``support_block`` over the row blocks ``ranges`` of (B, T, V) logits (u None for a
    given support ``index`` (B, T, k)); SupportRows of the N = B * T rows."""
    zr, yr = Rows(z), Rows(labels)
    ur = None if u is None else Rows(u)
    ir = None if index is None else Rows(index)
    parts = []
    for r0, r1 in ranges:
        y = yr.block(r0, r1)
        parts.append(support_block(zr.block(r0, r1), None if ur is None else ur.block(r0, r1),
                                   y, y != ignore_index,
                                   None if ir is None else ir.block(r0, r1), k, tau))
    if len(parts) == 1:
        return parts[0]
    return SupportRows(*(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True)))


def support_grad(ranges, z, out, rows: SupportRows, beta, coef, labels, cc, *,
                 tau: float) -> None:
    """``grad_block`` over the row blocks of (B, T, V) logits into ``out`` (B, T, V)."""
    zr, outr, yr = Rows(z), Rows(out), Rows(labels)
    for r0, r1 in ranges:
        block = outr.flat[r0:r1] if outr.flat is not None else torch.empty(
            (r1 - r0, z.shape[-1]), dtype=out.dtype, device=out.device)
        grad_block(block, zr.block(r0, r1), rows.lse_s[r0:r1], beta[r0:r1],
                   rows.index[r0:r1], coef[r0:r1], yr.block(r0, r1), cc[r0:r1], tau)
        if outr.flat is None:
            outr.write(r0, r1, block)
