"""``TritonBackend``: the ``RowBackend`` of the Triton kernels (CUDA, or Triton's
interpreter on CPU under ``TRITON_INTERPRET=1``), with its launch settings."""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..protocol import STACK_ELEMENTS, RowStats
from . import sparse
from .grad import write_grad as launch_grad
from .stats import label_logprob as launch_label
from .stats import row_stats as launch_stats


@dataclasses.dataclass(frozen=True)
class TritonSettings:
    """The launch settings of a ``TritonBackend``.

    max_block: the largest vocabulary tile (a power of two; docs/kernels.md, "Kernel
        details").
    target_programs: programs the gradient grid aims for: enough to fill an H100 (132 SMs, a
        few 16-warp programs each) several times over; fewer rows split into column chunks.
    stack_elements: views of at most this many logits in all are scored in one call.
    """

    max_block: int = 4096
    target_programs: int = 1024
    stack_elements: int = STACK_ELEMENTS


class TritonBackend:
    """The Triton ``RowBackend``: ``TritonBackend(settings)`` or ``TritonBackend(**fields of
    TritonSettings)``."""

    def __init__(self, settings: TritonSettings | None = None, **changes):
        self.settings = dataclasses.replace(settings or TritonSettings(), **changes)

    @property
    def stack_elements(self) -> int:
        return self.settings.stack_elements

    def vocab_tile(self, device: torch.device) -> int | None:
        return None

    def row_stats(self, z, u, labels, *, divergence: str, tau: float, alpha: float,
                  ignore_index: int) -> RowStats:
        return launch_stats(z, u, labels, divergence=divergence, tau=tau, alpha=alpha,
                            ignore_index=ignore_index, max_block=self.settings.max_block)

    def label_logprob(self, x, labels, *, tau: float, ignore_index: int):
        return launch_label(x, labels, tau=tau, ignore_index=ignore_index,
                            max_block=self.settings.max_block)

    def write_grad(self, z, u, labels, out, stats: RowStats, ck, cc, *, divergence: str,
                   tau: float, alpha: float) -> None:
        launch_grad(z, u, labels, out, stats, ck, cc, divergence=divergence, tau=tau,
                    alpha=alpha, max_block=self.settings.max_block,
                    target_programs=self.settings.target_programs)

    def support_stats(self, z, u, labels, index, *, k: int, tau: float, ignore_index: int):
        """The support pass of a sparse support (docs/losses.md, "Sparse supports")."""
        return sparse.support_stats(z, u, labels, index, k=k, tau=tau,
                                    ignore_index=ignore_index,
                                    max_block=self.settings.max_block)

    def support_grad(self, z, out, rows, beta, coef, labels, cc, *, tau: float) -> None:
        """The dense gradient of a sparse support into ``out`` (which may be ``z``)."""
        sparse.support_grad(z, out, rows, beta, coef, labels, cc, tau=tau,
                            max_block=self.settings.max_block)


@functools.cache
def default_backend() -> TritonBackend:
    """The process's shared ``TritonBackend`` (created on first use)."""
    return TritonBackend()
