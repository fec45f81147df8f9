"""The row-backend interface that the fused autograd Functions run on.

Two backends satisfy it: ``backends.triton`` (the Triton kernels, CUDA or the interpreter)
and ``backends.pytorch`` (the same passes in PyTorch over row blocks, the CPU path). A
backend may also offer ``row_stats_and_grad`` (the PyTorch one does): ``row_stats`` plus the
divergence gradient from the same call and whether that gradient is known to be finite, or
None where it declines (large inputs); the Function uses it when present.
Every tensor argument is a (B, T, ...) tensor read through its batch and time strides, so
views such as ``logits[:, :-1]`` need no copy. docs/kernels.md, "The backend Protocol",
describes the passes.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch

# Views holding at most this many logits in all are scored by one call on their stack (the
# stacking copies them; at that size a call's overhead costs more than the copy).
STACK_ELEMENTS = 1 << 20


class RowStats(NamedTuple):
    """Per-row float32 (B, T) results of the stats pass; zeros on ignored rows. (The PyTorch
    backend keeps ``lse_s`` and ``lse_t`` in float64, for the digits its gradient pass needs
    on rows of large logits.)

    ``aux`` is KL(p_S || M) for jsd and unused (zeros) for fkl and rkl. ``lse_gap`` is
    lse_S - lse_T formed without cancellation (docs/losses.md, "Accuracy when the student is
    close to the teacher"): the gradient pass needs it to more digits than the difference of
    the two stored log-sum-exps carries.
    """

    lse_s: torch.Tensor
    lse_t: torch.Tensor
    divergence: torch.Tensor
    aux: torch.Tensor
    student_label: torch.Tensor
    teacher_label: torch.Tensor
    lse_gap: torch.Tensor


@runtime_checkable
class RowBackend(Protocol):
    """The three passes over (B, T, V) logits that every fused path is built from.

    ``stack_elements``: views of at most this many logits in all are scored in one call.
    ``vocab_tile(device)``: head rows per tile of the fused-linear form's tiled schedule on
    ``device``, or None for whole-head GEMMs (docs/kernels.md, "The fused-linear form").
    """

    stack_elements: int

    def vocab_tile(self, device: torch.device) -> int | None:
        """Head rows per vocabulary tile of the fused-linear chunks, None: the whole head."""

    def row_stats(self, z: torch.Tensor, u: torch.Tensor, labels: torch.Tensor, *,
                  divergence: str, tau: float, alpha: float, ignore_index: int) -> RowStats:
        """One read of the student ``z`` and teacher ``u`` rows: log-sum-exps, D, labels
        (jsd reads them twice)."""

    def label_logprob(self, x: torch.Tensor, labels: torch.Tensor, *, tau: float,
                      ignore_index: int) -> torch.Tensor:
        """``log softmax(x / tau)[labels]`` per row as float32 (B, T); 0 on ignored rows."""

    def write_grad(self, z: torch.Tensor, u: torch.Tensor, labels: torch.Tensor,
                   out: torch.Tensor, stats: RowStats, ck: torch.Tensor, cc: torch.Tensor, *,
                   divergence: str, tau: float, alpha: float) -> None:
        """Write d loss / d z into ``out`` (which may be ``z``) from the row stats (all of
        ``RowStats`` but the label log-probs are read) and the per-row coefficients ``ck``
        (divergence) and ``cc`` (contrastive hinge)."""
