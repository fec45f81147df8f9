"""Adaptive agreement: which sequences the teacher views score (docs/losses.md, "Adaptive
agreement").

The agreement weight only ever scales a token's divergence D_t, so views are worth running
where the divergence mass is. A sequence's mass is its share of the unweighted kd term: the
mean of its D_t (normalize="sequence", each sequence weighs 1/B) or their sum ("token"). The
selection is the fewest sequences, largest mass first, whose masses sum to at least
``coverage`` times the batch's; their view forwards run up to the last completion position
any of them has. The selection is decided on the host (the view forwards' shapes follow it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ViewSelection(NamedTuple):
    """The rows (ascending) whose views are scored, the completion length their view
    forwards need, the (B, T) mask of the positions those forwards score, and the share of
    the batch's divergence mass the rows hold (1.0 when the batch has none)."""

    rows: torch.Tensor
    length: int
    view_mask: torch.Tensor
    covered: float


def sequence_mass(divergence: torch.Tensor, mask: torch.Tensor, normalize: str) -> torch.Tensor:
    """(B,) float64 divergence mass of each sequence: sum_t D_t over its completion tokens,
    divided by their count under normalize="sequence"."""
    d = torch.where(mask, divergence.detach().double(), 0.0)
    total = d.sum(-1)
    if normalize == "sequence":
        return total / mask.sum(-1).clamp(min=1)
    return total


def select_view_rows(divergence: torch.Tensor, mask: torch.Tensor, coverage: float,
                     normalize: str, at_least: int = 0) -> ViewSelection:
    """The fewest sequences, largest divergence mass first, holding at least ``coverage``
    of the mass of the (B, T) ``divergence`` over ``mask``; then at least ``at_least`` rows
    (the next by mass: e.g. a count agreed over ranks that must all run the forwards).
    coverage 1 takes every row with a completion token."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
    if normalize not in ("sequence", "token"):
        raise ValueError(f"normalize must be 'sequence' or 'token', got {normalize!r}")
    if divergence.shape != mask.shape or divergence.dim() != 2:
        raise ValueError(f"divergence and mask must both have shape (B, T), got "
                         f"{tuple(divergence.shape)} and {tuple(mask.shape)}")
    B = mask.shape[0]
    mass = sequence_mass(divergence, mask, normalize).cpu()
    has_tokens = mask.any(-1).cpu()
    total = float(mass.sum())
    order = torch.argsort(mass, descending=True, stable=True)
    if coverage >= 1.0:
        count = int(has_tokens.sum())
        order = torch.cat([order[has_tokens[order]], order[~has_tokens[order]]])
    elif total > 0:
        reached = torch.cumsum(mass[order], 0) >= coverage * total
        count = int(reached.nonzero()[0, 0]) + 1
    else:
        count = 0
    count = min(max(count, at_least), B)
    rows = order[:count].sort().values.to(mask.device)
    chosen = mask.index_select(0, rows)
    positions = torch.arange(mask.shape[1], device=mask.device)
    length = int((positions + 1).mul(chosen).amax()) if count else 0
    view_mask = torch.zeros_like(mask)
    view_mask[rows, :length] = True
    covered = float(mass[rows.cpu()].sum()) / total if total > 0 else 1.0
    return ViewSelection(rows, length, view_mask & mask, covered)
