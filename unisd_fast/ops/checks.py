"""Checks of tensor values (the label range, a tensor ``num_items_in_batch``), shared by both
loss forms; the fused-linear operator runs them inside itself, where reading tensor data
does not break a compiled caller's graph.

They never sync a CUDA stream with the host: on CUDA they are device-side asserts whose
failure surfaces at the next synchronising call (docs/api.md, "Errors");
``UNISD_FAST_SYNC_CHECKS=1`` checks on the host instead, with the readable ``ValueError``
that CPU tensors always get.
"""

from __future__ import annotations

import os

import torch

# Up to this many labels the host path checks them as a Python list: one copy instead of
# five tensor ops, which at that size cost more than a small loss's compiled call.
HOST_LABELS = 4096


def host_checks(device: torch.device) -> bool:
    """Whether value checks on ``device`` run on the host: always off CUDA, and on CUDA only
    under ``UNISD_FAST_SYNC_CHECKS=1`` (a host sync per call)."""
    return device.type != "cuda" or os.environ.get("UNISD_FAST_SYNC_CHECKS") == "1"


def require(ok, message: str, found=None) -> None:
    """ValueError(message) where ``ok`` (a bool, or a 0-dim bool tensor) is False; ``found()``
    (on the host path only) names the offending value. A tensor on CUDA without host checks:
    an asynchronous device-side assert, raised by CUDA at the next sync (it ends the CUDA
    context)."""
    if isinstance(ok, torch.Tensor) and not host_checks(ok.device):
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message if found is None else f"{message}; found {found()}")


def check_labels(labels, V: int, ignore_index: int, host_limit: int = HOST_LABELS) -> None:
    """Every label in [0, V) or equal to ignore_index (a device-side assert on CUDA)."""
    message = f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}"
    if host_checks(labels.device) and labels.numel() <= host_limit:
        values = labels.flatten().tolist()
        kept = set(values) - {ignore_index}
        require(not kept or (min(kept) >= 0 and max(kept) < V), message,
                lambda: next(v for v in values if v != ignore_index and not 0 <= v < V))
        return
    kept = torch.where(labels == ignore_index, 0, labels)
    lo, hi = torch.aminmax(kept)
    require((lo >= 0) & (hi < V), message,
            lambda: labels[(kept < 0) | (kept >= V)][0].item())


def check_num_items_value(n: torch.Tensor) -> None:
    """A one-element tensor ``num_items_in_batch`` holds a finite number > 0."""
    require((torch.isfinite(n) & (n > 0)).all(), "num_items_in_batch must be > 0 and finite",
            lambda: n.item())


def check_support(index, logprobs, labels, V: int, ignore_index: int, slack: float,
                  label_needed: bool) -> None:
    """A given sparse support on the rows whose label is kept: ``teacher_indices`` in
    [0, V) and distinct within a row, ``teacher_logprobs`` not NaN, at most ``slack`` above
    0, and of total probability at most 1 + ``slack``; with ``label_needed`` each label in
    its row's support (device-side asserts on CUDA)."""
    keep = (labels != ignore_index).unsqueeze(-1)
    idx = torch.where(keep, index.long(), torch.arange(index.shape[-1], device=index.device))
    bad = (idx < 0) | (idx >= V)
    require(~bad.any(), f"teacher_indices must lie in [0, {V}) on rows whose label is kept",
            lambda: idx[bad][0].item())
    ordered = idx.sort(-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
    require(~repeated.any(), "teacher_indices must not repeat an index within a row",
            lambda: ordered[repeated][0].tolist())
    lp = torch.where(keep, logprobs.float(), -1.0)
    require(~lp.isnan().any(), "teacher_logprobs must not be NaN on rows whose label is kept")
    require(~(lp > slack).any(), "teacher_logprobs must be <= 0 (log-probabilities)",
            lambda: lp.max().item())
    mass = lp.double().exp().sum(-1)
    require(~(keep.squeeze(-1) & (mass > 1 + slack)).any(),
            "teacher_logprobs must hold a total probability <= 1 per row",
            lambda: mass.max().item())
    if label_needed:
        held = (idx == labels.unsqueeze(-1)).any(-1) | ~keep.squeeze(-1)
        require(held.all(), "a label outside its row's teacher_indices needs "
                "teacher_label_logprobs (the teacher's log-prob of the label) with "
                "contrastive_weight > 0")
