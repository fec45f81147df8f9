"""Public fused-linear API: ``unisd_linear_loss`` (functional), ``UniSDLinearLoss`` (module).

Hidden states and lm_head weights in, the UniSD loss of the logits they define out, without
materialising the logits (docs/api.md, "unisd_linear_loss"; docs/kernels.md, "The
fused-linear form").
"""

from __future__ import annotations

import torch
from torch import nn

from .backends.choice import backend_named, check_impl, resolve_impl
from .losses import UniSDOutput, unisd_loss
from .ops.head import LinearHead
from .ops.linear_chunks import LinearCall
from .ops.linear_op import linear_loss_call
from .ops.sparse import SparseTeacher
from .ops.sparse_linear import SparseLinearFunction, sparse_linear_loss
from .validation import Inputs, check_config, validate_linear_inputs, validate_support
from .vocab_parallel import local_heads

CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}
CHUNK_BYTES_OTHER = 64 << 20


def default_chunk_bytes(device: torch.device) -> int:
    """Logits bytes per chunk: large enough for efficient GEMMs, small against the logits."""
    return CHUNK_BYTES.get(device.type, CHUNK_BYTES_OTHER)


def _reference(cfg, student: LinearHead, teacher: LinearHead, student_hidden, teacher_hidden,
               labels, views, view_logprobs, negative_hidden, negative_logprobs,
               num_items_in_batch, support, view_mask) -> UniSDOutput:
    """impl="reference": materialise every logits tensor (differentiably for the student)
    and call the eager reference of ``unisd_loss``. ``support``: further keyword arguments of
    unisd_loss (with a given sparse support, the teacher logits are not scored)."""
    z = student.logits(student_hidden)
    with torch.no_grad():
        def scored(h):
            return None if h is None else teacher.logits(h)
        view_logits = None if views is None else [scored(v) for v in views]
        u = None if "teacher_indices" in support else scored(teacher_hidden)
        negative_logits = scored(negative_hidden)
    return unisd_loss(z, u, labels, view_logits=view_logits, view_logprobs=view_logprobs,
                      negative_logits=negative_logits, negative_logprobs=negative_logprobs,
                      student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                      config=cfg, num_items_in_batch=num_items_in_batch, impl="reference",
                      view_mask=view_mask, **support)


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
    impl="auto",
    chunk_bytes: int | None = None,
    vocab_parallel=None,
    teacher_indices: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    teacher_label_logprobs: torch.Tensor | None = None,
    view_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
) -> UniSDOutput:
    """The UniSD loss of the logits ``f(h W^T + b)`` of student and teacher heads, computed
    chunk by chunk without materialising them (docs/api.md).

    student_hidden (B, T, H) and student_weight (V, H): differentiable (the weight and
    student_bias only when they require grad). teacher_hidden (B, T, Ht), teacher_weight
    (V, Ht), teacher_bias: never differentiated; pass the student's weight (and bias) tensors
    themselves for a shared head: one GEMM then serves both. view_hidden (K, B, T, Ht) or
    list, or view_logprobs (K, B, T); negative_hidden (B, T, Ht) or negative_logprobs (B, T):
    scored with the teacher head. f: ``x * logit_scale``, then ``logit_softcap * tanh(x /
    cap)`` (``LinearHead``). chunk_bytes: logits bytes per chunk (default
    ``default_chunk_bytes``). vocab_parallel: a process group (or ``VocabParallel``) over
    whose ranks the heads are split by vocabulary rows, each rank passing its shard; DTensor
    heads sharded on dim 0 are split over their mesh without it (``vocab_parallel.py``).
    A sparse support as in ``unisd_loss``: ``config.topk``, or the given teacher_indices and
    teacher_logprobs (B, T, k); teacher_hidden and teacher_weight may then be None (they
    serve only feature matching and hidden-state views or negative); whole heads only.
    view_mask (B, T) bool: the positions the views scored (adaptive agreement): only
    those view rows meet the head; elsewhere the weight is 1.
    old_logprobs (B, T): the rollout's label log-probs of ``config.importance_clip``.
    """
    cfg = check_config(config)
    given = teacher_indices is not None
    heads = local_heads(vocab_parallel, student_weight, teacher_weight, student_bias,
                        teacher_bias)
    student_weight, teacher_weight = heads.student_weight, heads.teacher_weight
    student_bias, teacher_bias = heads.student_bias, heads.teacher_bias
    if heads.group_name is not None and (given or cfg.topk is not None):
        raise ValueError("a sparse support (config.topk or teacher_indices) needs whole "
                         "heads, not vocab_parallel shards")
    views, softcap, scale = validate_linear_inputs(
        cfg, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        student_bias, teacher_bias, view_hidden, view_logprobs, negative_hidden,
        negative_logprobs, logit_softcap, logit_scale, num_items_in_batch, chunk_bytes,
        given_support=given, view_mask=view_mask, old_logprobs=old_logprobs)
    k = validate_support(cfg, Inputs("student_hidden", student_hidden, "H"),
                         student_weight.shape[0], labels, teacher_indices, teacher_logprobs,
                         teacher_label_logprobs)
    if given and teacher_weight is None:
        teacher_weight = student_weight
        teacher_bias = student_bias
    which = resolve_impl(impl, student_hidden.device)
    if which == "reference" and heads.group_name is not None:
        raise ValueError("impl='reference' takes whole heads, not vocab_parallel shards")
    if which == "reference":
        support = {"old_logprobs": old_logprobs}
        if given:
            support.update(teacher_indices=teacher_indices, teacher_logprobs=teacher_logprobs,
                           teacher_label_logprobs=teacher_label_logprobs)
        return _reference(cfg, LinearHead(student_weight, student_bias, softcap, scale),
                          LinearHead(teacher_weight, teacher_bias, softcap, scale),
                          student_hidden, teacher_hidden, labels, views, view_logprobs,
                          negative_hidden, negative_logprobs, num_items_in_batch, support,
                          view_mask)
    if k is not None:
        return _sparse(cfg, k, which, student_hidden, student_weight, student_bias,
                       teacher_hidden, teacher_weight, teacher_bias, labels, views,
                       view_logprobs, negative_hidden, negative_logprobs, softcap, scale,
                       num_items_in_batch, chunk_bytes, teacher_indices, teacher_logprobs,
                       teacher_label_logprobs, old_logprobs, view_mask)
    grad_on = torch.is_grad_enabled()
    shared = teacher_weight is student_weight
    if cfg.agreement == "none":
        views, view_logprobs, view_mask = None, None, None
    if cfg.contrastive_weight == 0:
        negative_hidden, negative_logprobs = None, None
    items_is_tensor = isinstance(num_items_in_batch, torch.Tensor)
    detached = lambda x: None if x is None else x.detach()
    out = linear_loss_call(
        student_hidden=student_hidden, student_weight=student_weight,
        student_bias=student_bias, teacher_hidden=teacher_hidden.detach(),
        teacher_weight=None if shared else teacher_weight.detach(),
        teacher_bias=None if teacher_bias is student_bias else detached(teacher_bias),
        labels=labels, view_hidden=[] if views is None else [v.detach() for v in views],
        view_logprobs=detached(view_logprobs), view_mask=view_mask,
        negative_hidden=detached(negative_hidden),
        negative_logprobs=detached(negative_logprobs),
        num_items_tensor=num_items_in_batch if items_is_tensor else None,
        old_logprobs=detached(old_logprobs),
        num_items=None if items_is_tensor or num_items_in_batch is None
        else float(num_items_in_batch),
        logit_softcap=softcap, logit_scale=scale, backend=which,
        hidden_grad=grad_on and student_hidden.requires_grad,
        weight_grad=grad_on and student_weight.requires_grad,
        bias_grad=grad_on and student_bias is not None and student_bias.requires_grad,
        shared_bias=student_bias is not None and teacher_bias is student_bias,
        chunk_bytes=chunk_bytes or default_chunk_bytes(student_hidden.device),
        vocab_group=heads.group_name, vocab_size=heads.vocab_size, config=cfg)
    return UniSDOutput(out.loss, *(p.detach() for p in out[1:7]))


def _sparse(cfg, k, which, student_hidden, student_weight, student_bias, teacher_hidden,
            teacher_weight, teacher_bias, labels, views, view_logprobs, negative_hidden,
            negative_logprobs, softcap, scale, num_items_in_batch, chunk_bytes,
            teacher_indices, teacher_logprobs, teacher_label_logprobs,
            old_logprobs, view_mask) -> UniSDOutput:
    """The fused-linear loss on a sparse support (``ops.sparse_linear``)."""
    backend = backend_named(which)
    B, T, H = student_hidden.shape
    N = B * T
    grad_on = torch.is_grad_enabled()
    flat = lambda x: None if x is None else x.detach().reshape(N, *x.shape[2:])
    student = LinearHead(student_weight.detach(), None if student_bias is None
                         else student_bias.detach(), softcap, scale)
    teacher = LinearHead(teacher_weight.detach(), None if teacher_bias is None
                         else teacher_bias.detach(), softcap, scale)
    shared = teacher_weight is student_weight and teacher_bias is student_bias
    th = student_hidden if teacher_hidden is None else teacher_hidden
    call = LinearCall(
        backend=backend, config=cfg, student_head=student, teacher_head=teacher,
        shared=shared, student_rows=student_hidden.detach().reshape(N, H),
        teacher_rows=th.detach().reshape(N, th.shape[-1]), labels=labels.reshape(N),
        chunk_bytes=chunk_bytes or default_chunk_bytes(student_hidden.device),
        grads=(grad_on and student_hidden.requires_grad,
               grad_on and student_weight.requires_grad,
               grad_on and student_bias is not None and student_bias.requires_grad),
        vocab_tile=backend.vocab_tile(student_hidden.device),
        old_logprobs=None if old_logprobs is None else old_logprobs.detach().reshape(N))
    support = SparseTeacher(k, None, flat(teacher_indices), flat(teacher_logprobs),
                            flat(teacher_label_logprobs))
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.reshape(()).float()
    detached = lambda x: None if x is None else x.detach()

    def run():
        return sparse_linear_loss(
            call, support, (B, T), None if views is None else [flat(v) for v in views],
            detached(view_logprobs), flat(negative_hidden), detached(negative_logprobs),
            student_hidden.detach(), detached(teacher_hidden), num_items_in_batch,
            None if view_mask is None else view_mask.detach())

    outs = SparseLinearFunction.apply(student_hidden, student_weight, student_bias, run)
    return UniSDOutput(*outs)


class UniSDLinearLoss(nn.Module):
    """``unisd_linear_loss`` as a module: ``UniSDLinearLoss(config, impl)(student_hidden,
    student_weight, teacher_hidden, teacher_weight, labels, **kwargs)``."""

    def __init__(self, config=None, impl="auto", chunk_bytes: int | None = None):
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
