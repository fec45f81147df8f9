"""(B, T, ...) tensors seen as N = B * T rows, read and written in blocks of rows."""

from __future__ import annotations

import torch


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the same elements of the same memory."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class Rows:
    """A (B, T, ...) tensor seen as N = B * T rows: ``block(r0, r1)`` gives rows r0:r1 as a
    2-D (or 1-D) tensor, a view when the layout allows and a block-sized copy otherwise;
    ``write(r0, r1, value)`` stores into those rows."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.T = x.shape[1]
        try:
            self.flat = x.view(-1, *x.shape[2:])
        except RuntimeError:
            self.flat = None

    def _index(self, r0: int, r1: int):
        r = torch.arange(r0, r1, device=self.x.device)
        return r // self.T, r % self.T

    def block(self, r0: int, r1: int) -> torch.Tensor:
        if self.flat is not None:
            return self.flat[r0:r1]
        return self.x[self._index(r0, r1)]

    def write(self, r0: int, r1: int, value: torch.Tensor) -> None:
        if self.flat is not None:
            self.flat[r0:r1] = value
        else:
            self.x[self._index(r0, r1)] = value
