"""``torch.ops.unisd_fast.linear_loss``: the fused-linear loss as a registered operator.

A ``torch.library`` custom op with a fake (shape) implementation and an autograd formula, so
that ``torch.compile`` of a training step that calls ``unisd_linear_loss`` keeps it in one
graph as an opaque node instead of breaking the graph. The op returns the loss terms and the
gradients it computed in forward; backward only scales those by grad_output (in place, so
that the weight-sized gradient is handed to autograd without a copy). Its arguments are
declared once, by ``LinearOpArgs``; its outputs by ``LinearOpOutputs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..backends.choice import backend_named
from ..backends.shards.combine import VocabShards
from ..backends.shards.layout import gather_layout
from ..config import UniSDConfig
from .checks import check_labels, check_num_items_value
from .head import LinearHead
from .linear_chunks import LinearCall, linear_loss
from .op_schema import OpArguments


@dataclass(frozen=True)
class LinearOpArgs:
    """The operator's arguments. ``teacher_weight`` None: the student's (a shared head);
    ``shared_bias``: the teacher's bias is the student's. ``num_items_tensor`` or
    ``num_items``: a tensor or a number ``num_items_in_batch``. ``backend``: a name of
    ``backends.choice.resolve_impl``. ``*_grad``: which gradients to compute.
    ``vocab_group``: the name of the process group over which the heads are split by
    vocabulary rows (this rank's rows given), None for whole heads; ``vocab_size``: the
    whole vocabulary the shards must add up to, None to take their sum."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    student_bias: torch.Tensor | None
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor | None
    teacher_bias: torch.Tensor | None
    labels: torch.Tensor
    view_hidden: list[torch.Tensor]
    view_logprobs: torch.Tensor | None
    view_mask: torch.Tensor | None
    negative_hidden: torch.Tensor | None
    negative_logprobs: torch.Tensor | None
    num_items_tensor: torch.Tensor | None
    old_logprobs: torch.Tensor | None
    num_items: float | None
    logit_softcap: float | None
    logit_scale: float | None
    backend: str
    hidden_grad: bool
    weight_grad: bool
    bias_grad: bool
    shared_bias: bool
    chunk_bytes: int
    vocab_group: str | None
    vocab_size: int | None
    config: UniSDConfig


class LinearOpOutputs(NamedTuple):
    """The operator's results: the loss, its terms and (B, T) diagnostics, and the gradients
    computed in forward (empty tensors where not asked for)."""

    loss: torch.Tensor
    kd: torch.Tensor
    contrastive: torch.Tensor
    feature: torch.Tensor
    divergence: torch.Tensor
    weight: torch.Tensor
    clipped: torch.Tensor
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor


ARGS = OpArguments(LinearOpArgs)
SCHEMA = f"({ARGS.schema}) -> ({', '.join(['Tensor'] * len(LinearOpOutputs._fields))})"


def _arguments(args) -> LinearOpArgs:
    return ARGS.unpack(args, lambda cls, fields: cls.from_validated_fields(**fields))


@torch.library.custom_op("unisd_fast::linear_loss", mutates_args=(), schema=SCHEMA)
def linear_loss_op(*args):
    a = _arguments(args)
    cfg, hs, ht = a.config, a.student_hidden, a.teacher_hidden
    shards = None
    if a.vocab_group is not None:
        group = torch.distributed.distributed_c10d._resolve_process_group(a.vocab_group)
        layout = gather_layout(a.student_weight.shape[0], a.chunk_bytes, a.labels,
                               cfg.ignore_index, group, a.vocab_size)
        shards = VocabShards(group, layout)
    check_labels(a.labels, a.student_weight.shape[0] if shards is None else shards.layout.full,
                 cfg.ignore_index)
    if a.num_items_tensor is not None:
        check_num_items_value(a.num_items_tensor)
    backend = backend_named(a.backend)
    B, T, H = hs.shape
    N = B * T
    student = LinearHead(a.student_weight, a.student_bias, a.logit_softcap, a.logit_scale)
    teacher = LinearHead(a.student_weight if a.teacher_weight is None else a.teacher_weight,
                         a.student_bias if a.shared_bias else a.teacher_bias,
                         a.logit_softcap, a.logit_scale)
    no_biases = a.student_bias is None and a.teacher_bias is None
    call = LinearCall(
        backend=backend, config=cfg, student_head=student, teacher_head=teacher,
        shared=a.teacher_weight is None and (a.shared_bias or no_biases),
        student_rows=hs.reshape(N, H), teacher_rows=ht.reshape(N, ht.shape[-1]),
        labels=a.labels.reshape(N),
        chunk_bytes=a.chunk_bytes if shards is None else shards.layout.chunk_bytes,
        grads=(a.hidden_grad, a.weight_grad, a.bias_grad),
        vocab_tile=backend.vocab_tile(hs.device), shards=shards,
        old_logprobs=None if a.old_logprobs is None else a.old_logprobs.reshape(N))
    negative = a.negative_hidden
    with torch.no_grad():
        result = linear_loss(
            call, (B, T), [v.reshape(N, v.shape[-1]) for v in a.view_hidden], a.view_logprobs,
            None if negative is None else negative.reshape(N, negative.shape[-1]),
            a.negative_logprobs, hs, ht,
            a.num_items if a.num_items_tensor is None else a.num_items_tensor, a.view_mask)
    t = result.terms
    none = hs.new_empty(0)
    return tuple(LinearOpOutputs(
        t.loss, t.kd, t.contrastive, t.feature, t.divergence.clone(), t.weight, t.clipped,
        none if result.grad_hidden is None else result.grad_hidden,
        none.clone() if result.grad_weight is None else result.grad_weight,
        none.clone() if result.grad_bias is None else result.grad_bias))


@linear_loss_op.register_fake
def _fake(*args):
    a = _arguments(args)
    hs, ws = a.student_hidden, a.student_weight
    B, T, _ = hs.shape
    scalar = hs.new_empty((), dtype=torch.float32)
    row = hs.new_empty((B, T), dtype=torch.float32)
    return tuple(LinearOpOutputs(
        scalar, scalar.clone(), scalar.clone(), scalar.clone(), row, row.clone(),
        hs.new_empty((B, T), dtype=torch.bool),
        hs.new_empty(hs.shape) if a.hidden_grad else hs.new_empty(0),
        ws.new_empty(ws.shape) if a.weight_grad else hs.new_empty(0),
        ws.new_empty(ws.shape[0]) if a.bias_grad else hs.new_empty(0)))


GRADS = ("grad_hidden", "grad_weight", "grad_bias")
DIFFERENTIABLE = ("student_hidden", "student_weight", "student_bias")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(output[LinearOpOutputs._fields.index(n)] for n in GRADS))
    ctx.n_views = len(inputs[ARGS.position("view_hidden")])
    # Only the loss is differentiated: no zero gradients for the other outputs (one of
    # them is weight-sized).
    ctx.set_materialize_grads(False)


def _scaled(grad, g):
    """grad * g, in place outside of compilation: the op owns ``grad`` and hands it over,
    so a weight-sized gradient costs no copy (a second backward through the same call then
    fails autograd's saved-tensor version check instead of giving a wrong result)."""
    if grad.numel() == 0:
        return None
    return grad * g if torch.compiler.is_compiling() else grad.mul_(g)


def _backward(ctx, grad_loss, *_):
    grads = [None] * len(ARGS.flat)
    grads[ARGS.position("view_hidden")] = [None] * ctx.n_views
    if grad_loss is not None:
        g = grad_loss.float()
        for name, grad in zip(DIFFERENTIABLE, ctx.saved_tensors, strict=True):
            grads[ARGS.position(name)] = _scaled(grad, g)
    return tuple(grads)


linear_loss_op.register_autograd(_backward, setup_context=_setup_context)


def linear_loss_call(**arguments) -> LinearOpOutputs:
    """The operator on the fields of ``LinearOpArgs`` given by name."""
    return LinearOpOutputs(*linear_loss_op(*ARGS.pack(arguments)))
