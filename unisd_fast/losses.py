"""Public loss API: ``unisd_loss`` (functional), ``UniSDLoss`` (module), impl dispatch."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from . import small, torch_backend
from .config import IMPLS, UniSDConfig
from .fused import unisd_fused
from .reference import unisd_loss_reference
from .validation import validate_inplace, validate_inputs


@dataclass
class UniSDOutput:
    """Result of the UniSD loss.

    ``loss`` is differentiable wrt the student logits and hidden states; the rest is
    detached: ``kd``, ``contrastive``, ``feature`` are the unweighted term values (``loss`` =
    kd_weight * kd + contrastive_weight * contrastive + feature_weight * feature), and the
    (B, T) diagnostics are the divergence before clipping, the agreement weight and the
    clipped mask (all zero on ignored tokens).
    """

    loss: torch.Tensor
    kd: torch.Tensor
    contrastive: torch.Tensor
    feature: torch.Tensor
    token_divergence: torch.Tensor
    token_weight: torch.Tensor
    clipped: torch.Tensor


def triton_available_for(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def check_config(config) -> UniSDConfig:
    """``config``, or the default config for None; a TypeError for anything else."""
    cfg = UniSDConfig() if config is None else config
    if not isinstance(cfg, UniSDConfig):
        raise TypeError(f"config must be a UniSDConfig, got {type(cfg).__name__}")
    return cfg


def kernels_interpreted() -> bool:
    """Whether ``unisd_fast.kernels`` run in Triton's interpreter. Triton settles this when it
    decorates the kernels, at their import, from TRITON_INTERPRET at that moment."""
    import triton

    from .kernels import common

    return not isinstance(common.row_offset, triton.runtime.JITFunction)


def resolve_impl(impl: str, device: torch.device) -> str:
    check_impl(impl)
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and not triton_available_for(device):
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (got {device.type}); on CPU set "
            "TRITON_INTERPRET=1 before importing unisd_fast, or use impl='torch'"
        )
    if impl == "triton" and device.type == "cpu" and not kernels_interpreted():
        raise RuntimeError(
            "impl='triton' on CPU tensors: TRITON_INTERPRET=1 was set after "
            "unisd_fast.kernels was imported, so the kernels were built for a GPU; set "
            "TRITON_INTERPRET=1 before importing unisd_fast, or use impl='torch'"
        )
    return impl


def unisd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    view_logits=None,
    view_logprobs: torch.Tensor | None = None,
    negative_logits: torch.Tensor | None = None,
    negative_logprobs: torch.Tensor | None = None,
    student_hidden: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    config: UniSDConfig | None = None,
    num_items_in_batch=None,
    impl: str = "auto",
    inplace_backward: bool = False,
) -> UniSDOutput:
    """The UniSD loss of docs/losses.md on (B, T, V) logits and (B, T) labels.

    view_logits: (K, B, T, V) tensor or list of K (B, T, V) tensors, or view_logprobs
    (K, B, T) already scored; needed with agreement. negative_logits (B, T, V) or
    negative_logprobs (B, T): needed with contrastive_weight > 0. student_hidden and
    teacher_hidden (B, T, H): needed with feature_weight > 0. impl: "auto", "triton",
    "torch" or "reference". inplace_backward=True writes the logits gradient into
    student_logits' own buffer (fused impls only; the logits are then overwritten).
    """
    cfg = check_config(config)
    views = validate_inputs(
        cfg, student_logits, teacher_logits, labels, view_logits, view_logprobs,
        negative_logits, negative_logprobs, student_hidden, teacher_hidden, num_items_in_batch,
    )
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.reshape(())
    if inplace_backward:
        validate_inplace(student_logits)
    which = resolve_impl(impl, student_logits.device)
    if which == "reference":
        if inplace_backward:
            raise ValueError("inplace_backward=True is not supported by impl='reference'")
        out = unisd_loss_reference(
            student_logits, teacher_logits, labels, config=cfg, view_logits=views,
            view_logprobs=view_logprobs, negative_logits=negative_logits,
            negative_logprobs=negative_logprobs, student_hidden=student_hidden,
            teacher_hidden=teacher_hidden, num_items_in_batch=num_items_in_batch,
        )
        return UniSDOutput(**out)
    first = None
    if which == "triton":
        from . import kernels as backend
    else:
        backend, first = torch_backend.default_backend(), small.run
    parts = unisd_fused(
        student_logits, teacher_logits, labels, backend=backend, config=cfg, views=views,
        view_logprobs=view_logprobs, negative_logits=negative_logits,
        negative_logprobs=negative_logprobs, student_hidden=student_hidden,
        teacher_hidden=teacher_hidden, num_items_in_batch=num_items_in_batch,
        inplace_backward=inplace_backward, first=first,
    )
    return UniSDOutput(*parts)


class UniSDLoss(nn.Module):
    """``unisd_loss`` as a module: ``UniSDLoss(config, impl)(student_logits, ...)``."""

    def __init__(self, config: UniSDConfig | None = None, impl: str = "auto",
                 inplace_backward: bool = False):
        super().__init__()
        self.config = check_config(config)
        self.impl = check_impl(impl)
        self.inplace_backward = inplace_backward

    def forward(self, student_logits, teacher_logits, labels, **kwargs) -> UniSDOutput:
        return unisd_loss(student_logits, teacher_logits, labels, config=self.config,
                          impl=self.impl, inplace_backward=self.inplace_backward, **kwargs)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, config={self.config}"
