"""Sparse supports, common to both backends: the per-row results of a support pass
(``SupportRows``) and the student top-k over vocabulary tiles, merged (docs/losses.md,
"Sparse supports")."""

from __future__ import annotations

from typing import NamedTuple

import torch

LOW_BITS = (1 << 32) - 1


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


# A column's key orders columns by value, then by lower index: the float32 bit pattern made
# monotone as an int32 (negative floats have their 31 low bits flipped; -0 is read as +0),
# times 2^32, plus 2^32 - 1 - column. The top-k of the keys is the top-k of the values with
# ties at the k-th value going to the lower columns, whatever order a topk returns.
def column_keys(x: torch.Tensor, v0: int) -> torch.Tensor:
    bits = (x.float() + 0.0).view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    cols = torch.arange(v0, v0 + x.shape[-1], device=x.device)
    return bits * (1 << 32) + (LOW_BITS - cols)


def key_columns(keys: torch.Tensor) -> torch.Tensor:
    """The columns of keys made by ``column_keys``."""
    return LOW_BITS - (keys & LOW_BITS)


def merge_topk(best: torch.Tensor | None, keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of ``best`` (rows x k, or None) and ``keys`` (rows x c): the running
    top-k of a sweep over vocabulary tiles."""
    both = keys if best is None else torch.cat([best, keys], dim=1)
    return both.topk(min(k, both.shape[1]), dim=1).values


def tiled_topk(z: torch.Tensor, k: int, tile: int) -> torch.Tensor:
    """Columns of the k largest logits of each row of z (rows x V), ties to the lower
    column, by a sweep over tiles of ``tile`` columns whose top-k merge into a running one."""
    best = None
    for v0 in range(0, z.shape[1], tile):
        best = merge_topk(best, column_keys(z[:, v0:v0 + tile], v0), k)
    return key_columns(best)
