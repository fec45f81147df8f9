"""Public fused-linear API: ``unisd_linear_loss`` (functional), ``UniSDLinearLoss`` (module).

Hidden states and lm_head weights in, the UniSD loss of the logits they define out, without
materialising the logits (docs/api.md, docs/kernels.md "The fused-linear form").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import linear_op
from .linear_chunks import LogitMap
from .linear_validation import validate_linear_inputs
from .losses import UniSDOutput, check_config, check_impl, resolve_impl, unisd_loss

CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}
CHUNK_BYTES_OTHER = 64 << 20


def default_chunk_bytes(device: torch.device) -> int:
    """Logits bytes per chunk: large enough for efficient GEMMs, small against the logits."""
    return CHUNK_BYTES.get(device.type, CHUNK_BYTES_OTHER)


def _materialised(h, weight, bias, logit_map: LogitMap):
    x = F.linear(h, weight, bias)
    if logit_map.scale is not None:
        x = x * logit_map.scale
    if logit_map.softcap is not None:
        x = logit_map.softcap * torch.tanh(x / logit_map.softcap)
    return x


def _reference(cfg, logit_map, student_hidden, student_weight, teacher_hidden, teacher_weight,
               labels, student_bias, teacher_bias, views, view_logprobs, negative_hidden,
               negative_logprobs, num_items_in_batch) -> UniSDOutput:
    """impl="reference": materialise every logits tensor (differentiably for the student)
    and call the eager reference of ``unisd_loss``."""
    z = _materialised(student_hidden, student_weight, student_bias, logit_map)
    with torch.no_grad():
        def teacher(h):
            return None if h is None else _materialised(h, teacher_weight, teacher_bias,
                                                       logit_map)
        u = teacher(teacher_hidden)
        view_logits = None if views is None else [teacher(v) for v in views]
        negative_logits = teacher(negative_hidden)
    return unisd_loss(z, u, labels, view_logits=view_logits, view_logprobs=view_logprobs,
                      negative_logits=negative_logits, negative_logprobs=negative_logprobs,
                      student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                      config=cfg, num_items_in_batch=num_items_in_batch, impl="reference")


def unisd_linear_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    view_hidden=None,
    view_logprobs: torch.Tensor | None = None,
    negative_hidden: torch.Tensor | None = None,
    negative_logprobs: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    logit_scale: float | None = None,
    config=None,
    num_items_in_batch=None,
    impl: str = "auto",
    chunk_bytes: int | None = None,
) -> UniSDOutput:
    """The UniSD loss of the logits ``f(h W^T + b)`` of student and teacher heads, computed
    chunk by chunk without materialising them (docs/api.md).

    student_hidden (B, T, H) and student_weight (V, H): differentiable (the weight and
    student_bias only when they require grad). teacher_hidden (B, T, Ht), teacher_weight
    (V, Ht), teacher_bias: never differentiated; pass the student's weight (and bias) tensors
    themselves for a shared head: one GEMM then serves both. view_hidden (K, B, T, Ht) or
    list, or view_logprobs (K, B, T); negative_hidden (B, T, Ht) or negative_logprobs (B, T): scored
    with the teacher head. f: ``x * logit_scale``, then ``logit_softcap * tanh(x / cap)``.
    chunk_bytes: logits bytes per chunk (default ``default_chunk_bytes``).
    """
    cfg = check_config(config)
    views, softcap, scale = validate_linear_inputs(
        cfg, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        student_bias, teacher_bias, view_hidden, view_logprobs, negative_hidden,
        negative_logprobs, logit_softcap, logit_scale, num_items_in_batch, chunk_bytes)
    logit_map = LogitMap(softcap, scale)
    which = resolve_impl(impl, student_hidden.device)
    if which == "reference":
        return _reference(cfg, logit_map, student_hidden, student_weight, teacher_hidden,
                          teacher_weight, labels, student_bias, teacher_bias, views,
                          view_logprobs, negative_hidden, negative_logprobs,
                          num_items_in_batch)
    grad_on = torch.is_grad_enabled()
    shared = teacher_weight is student_weight
    if cfg.agreement == "none":
        views, view_logprobs = None, None
    if cfg.contrastive_weight == 0:
        negative_hidden, negative_logprobs = None, None
    items_is_tensor = isinstance(num_items_in_batch, torch.Tensor)
    parts = linear_op.linear_loss_op(
        student_hidden, student_weight, student_bias, teacher_hidden.detach(),
        None if shared else teacher_weight.detach(),
        None if teacher_bias is None or teacher_bias is student_bias else teacher_bias.detach(),
        labels,
        [] if views is None else [v.detach() for v in views],
        None if view_logprobs is None else view_logprobs.detach(),
        None if negative_hidden is None else negative_hidden.detach(),
        None if negative_logprobs is None else negative_logprobs.detach(),
        num_items_in_batch if items_is_tensor else None,
        None if items_is_tensor or num_items_in_batch is None else float(num_items_in_batch),
        softcap, scale, which,
        grad_on and student_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
        student_bias is not None and teacher_bias is student_bias,
        chunk_bytes or default_chunk_bytes(student_hidden.device),
        *linear_op.config_args(cfg))
    return UniSDOutput(parts[0], *(p.detach() for p in parts[1:7]))


class UniSDLinearLoss(nn.Module):
    """``unisd_linear_loss`` as a module: ``UniSDLinearLoss(config, impl)(student_hidden,
    student_weight, teacher_hidden, teacher_weight, labels, **kwargs)``."""

    def __init__(self, config=None, impl: str = "auto", chunk_bytes: int | None = None):
        super().__init__()
        self.config = check_config(config)
        self.impl = check_impl(impl)
        self.chunk_bytes = chunk_bytes

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                **kwargs) -> UniSDOutput:
        return unisd_linear_loss(student_hidden, student_weight, teacher_hidden,
                                 teacher_weight, labels, config=self.config, impl=self.impl,
                                 chunk_bytes=self.chunk_bytes, **kwargs)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, config={self.config}"
