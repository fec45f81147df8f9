"""Public loss API on logits: ``unisd_loss`` (functional), ``UniSDLoss`` (module) and
``label_logprobs`` (the label pass alone, e.g. for views scored ahead of the loss)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backends.choice import backend_named, check_impl, resolve_impl
from .config import UniSDConfig
from .ops import small
from .ops.checks import check_labels
from .ops.fused import unisd_fused
from .ops.sparse import SparseTeacher, unisd_sparse
from .reference import label_logprob, unisd_loss_reference
from .validation import (
    Inputs,
    check_config,
    check_positive,
    validate_inplace,
    validate_inputs,
    validate_support,
)
from .vocab_parallel import logit_shards


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
    impl="auto",
    inplace_backward: bool = False,
    teacher_indices: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    teacher_label_logprobs: torch.Tensor | None = None,
    view_mask: torch.Tensor | None = None,
    vocab_parallel=None,
    old_logprobs: torch.Tensor | None = None,
) -> UniSDOutput:
    """The UniSD loss of docs/losses.md on (B, T, V) logits and (B, T) labels.

    view_logits: (K, B, T, V) tensor or list of K (B, T, V) tensors, or view_logprobs
    (K, B, T) already scored; needed with agreement. negative_logits (B, T, V) or
    negative_logprobs (B, T): needed with contrastive_weight > 0. student_hidden and
    teacher_hidden (B, T, H): needed with feature_weight > 0. view_mask (B, T) bool: the
    positions the views scored (adaptive agreement; elsewhere the weight is 1). impl: one
    of ``IMPLS`` or a ``RowBackend`` (docs/api.md). inplace_backward=True writes the logits
    gradient into student_logits' own buffer (fused impls only; the logits are then
    overwritten).
    A sparse support (docs/losses.md, "Sparse supports"): ``config.topk`` (the student's
    top-k, teacher log-probs from teacher_logits), or teacher_logits None and the given
    teacher_indices with teacher_logprobs (B, T, k), and teacher_label_logprobs (B, T) for
    a contrastive term whose labels are not all in the support. old_logprobs (B, T): the
    rollout's label log-probs of ``config.importance_clip``.
    vocab_parallel: a process group (or ``VocabParallel``) over whose ranks the logits (the
    student's, teacher's, views' and negative's) are split by vocabulary, each rank passing
    its (B, T, V_r) shard and the same full-vocab labels; the gradient is that of its shard
    (docs/kernels.md, "Vocabulary-parallel heads").
    """
    cfg = check_config(config)
    shards = None
    if vocab_parallel is not None:
        # the logits' and labels' own checks before the gather
        Inputs("student_logits", student_logits, "V").labels(labels)
        shards = logit_shards(vocab_parallel, student_logits, labels, cfg.ignore_index)
        if teacher_indices is not None or cfg.topk is not None:
            raise ValueError("a sparse support (config.topk or teacher_indices) needs whole "
                             "logits, not vocab_parallel shards")
    views = validate_inputs(
        cfg, student_logits, teacher_logits, labels, view_logits, view_logprobs,
        negative_logits, negative_logprobs, student_hidden, teacher_hidden, num_items_in_batch,
        given_support=teacher_indices is not None, old_logprobs=old_logprobs,
        view_mask=view_mask, label_vocab=None if shards is None else shards.layout.full,
    )
    k = validate_support(cfg, Inputs("student_logits", student_logits, "V"),
                         student_logits.shape[-1], labels, teacher_indices, teacher_logprobs,
                         teacher_label_logprobs)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.reshape(())
    if inplace_backward:
        validate_inplace(student_logits)
    which = resolve_impl(impl, student_logits.device)
    if which == "reference" and shards is not None:
        raise ValueError("impl='reference' takes whole logits, not vocab_parallel shards")
    if which == "reference":
        if inplace_backward:
            raise ValueError("inplace_backward=True is not supported by impl='reference'")
        out = unisd_loss_reference(
            student_logits, teacher_logits, labels, config=cfg, view_logits=views,
            view_logprobs=view_logprobs, negative_logits=negative_logits,
            negative_logprobs=negative_logprobs, student_hidden=student_hidden,
            teacher_hidden=teacher_hidden, num_items_in_batch=num_items_in_batch,
            teacher_indices=teacher_indices, teacher_logprobs=teacher_logprobs,
            teacher_label_logprobs=teacher_label_logprobs, old_logprobs=old_logprobs,
            view_mask=view_mask,
        )
        return UniSDOutput(**out)
    if k is not None:
        teacher = SparseTeacher(k, None if teacher_logits is None else teacher_logits.detach(),
                                teacher_indices, teacher_logprobs, teacher_label_logprobs)
        return UniSDOutput(*unisd_sparse(
            student_logits, labels, backend=backend_named(which), config=cfg, teacher=teacher,
            views=views, view_logprobs=view_logprobs, negative_logits=negative_logits,
            negative_logprobs=negative_logprobs, student_hidden=student_hidden,
            teacher_hidden=teacher_hidden, num_items_in_batch=num_items_in_batch,
            inplace_backward=inplace_backward, old_logprobs=old_logprobs,
            view_mask=view_mask))
    parts = unisd_fused(
        student_logits, teacher_logits, labels, backend=backend_named(which), config=cfg,
        views=views, view_logprobs=view_logprobs, negative_logits=negative_logits,
        negative_logprobs=negative_logprobs, student_hidden=student_hidden,
        teacher_hidden=teacher_hidden, num_items_in_batch=num_items_in_batch,
        inplace_backward=inplace_backward, first=small.run, view_mask=view_mask,
        shards=shards, old_logprobs=old_logprobs,
    )
    return UniSDOutput(*parts)


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, *,
                   ignore_index: int = -100, impl="auto") -> torch.Tensor:
    """``log_softmax(logits / temperature)[labels]`` of (B, T, V) logits at (B, T) labels:
    float32 (B, T), 0 where ``labels == ignore_index``, never differentiated. One read of the
    logits, no (B, T, V) temporary (the label pass of docs/kernels.md)."""
    inputs = Inputs("logits", logits, "V")
    inputs.labels(labels)
    check_labels(labels, logits.shape[-1], ignore_index)
    tau = check_positive("temperature", temperature)
    which = resolve_impl(impl, logits.device)
    with torch.no_grad():
        if which == "reference":
            return label_logprob(logits.float(), labels, labels != ignore_index, tau).float()
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        return backend_named(which).label_logprob(x, labels, tau=tau,
                                                  ignore_index=ignore_index)


class UniSDLoss(nn.Module):
    """``unisd_loss`` as a module: ``UniSDLoss(config, impl)(student_logits, ...)``."""

    def __init__(self, config: UniSDConfig | None = None, impl="auto",
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
