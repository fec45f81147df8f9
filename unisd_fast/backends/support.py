"""Sparse supports, common to both backends: the per-row results of a support pass
(``SupportRows``) and the student's top-k with ties at the k-th value going to the lower
column (docs/losses.md, "Sparse supports")."""

from __future__ import annotations

from typing import NamedTuple

import torch


class SupportRows(NamedTuple):
    """Per-row results of a support pass over N rows (zeros on ignored rows).

    ``lse_s``: the student's log-sum-exp of z / tau (float64, N); ``index``: the support
    (int64, N x k); ``student_lp``: log p_S there (float64, N x k); ``teacher_lp``: log p_T
    there (float64, N x k; None for a given support, whose teacher log-probs are inputs);
    ``student_label``, ``teacher_label``: the label log-probs (float32, N; the teacher's 0
    for a given support).
    """

    lse_s: torch.Tensor
    index: torch.Tensor
    student_lp: torch.Tensor
    teacher_lp: torch.Tensor | None
    student_label: torch.Tensor
    teacher_label: torch.Tensor


def lower_columns(x: torch.Tensor, k: int, kth: torch.Tensor) -> torch.Tensor:
    """Columns (ascending) of the k largest values of each row of ``x`` whose k-th largest
    value is ``kth`` (rows x 1): every column above it, then the lowest columns equal to it."""
    above = x > kth
    equal = x == kth
    wanted = k - above.sum(-1, keepdim=True)
    keep = above | (equal & (equal.cumsum(-1) <= wanted))
    return keep.nonzero()[:, 1].view(x.shape[0], k)


def topk_columns(values: torch.Tensor, columns: torch.Tensor | None, k: int) -> torch.Tensor:
    """The columns of the k largest of ``values`` (rows x c; their columns ``columns``, None:
    0..c-1), ties at the k-th value to the lower column: one top-(k+1), and where the
    (k+1)-th equals the k-th, those rows by ``lower_columns``."""
    c = values.shape[-1]
    if k >= c:
        return columns if columns is not None else \
            torch.arange(c, device=values.device).expand(values.shape)
    top, at = values.topk(k + 1, dim=-1)
    at = at[:, :k]
    tied = (top[:, k] == top[:, k - 1]).nonzero().squeeze(1)
    if tied.numel():
        rows = values[tied]
        if columns is not None:  # order the candidates by column first
            order = columns[tied].argsort(-1)
            rows = rows.gather(-1, order)
            at[tied] = order.gather(-1, lower_columns(rows, k, top[tied, k - 1:k]))
        else:
            at[tied] = lower_columns(rows, k, top[tied, k - 1:k])
    return at if columns is None else columns.gather(-1, at)
