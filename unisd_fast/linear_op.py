"""``torch.ops.unisd_fast.linear_loss``: the fused-linear loss as a registered operator.

A ``torch.library`` custom op with a fake (shape) implementation and an autograd formula, so
that ``torch.compile`` of a training step that calls ``unisd_linear_loss`` keeps it in one
graph as an opaque node instead of breaking the graph. The op returns the loss terms and the
gradients it computed in forward; backward only scales those by grad_output (in place, so
that the weight-sized gradient is handed to autograd without a copy).
"""

from __future__ import annotations

import dataclasses

import torch

from . import torch_backend
from .config import UniSDConfig
from .linear_chunks import Head, LinearCall, LogitMap, linear_loss, vocab_tile_for
from .validation import check_labels, check_num_items

# The config travels as one typed argument per UniSDConfig field (the op schema allows no
# Python objects). Field annotations are strings (postponed evaluation).
_SCHEMA_TYPES = {"str": "str", "float": "float", "float | None": "float?", "int": "int"}
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(UniSDConfig))
_CONFIG_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}"
                           for f in dataclasses.fields(UniSDConfig))

TENSOR_ARGS = (
    "Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
    "Tensor teacher_hidden, Tensor? teacher_weight, Tensor? teacher_bias, Tensor labels, "
    "Tensor[] view_hidden, Tensor? view_logprobs, Tensor? negative_hidden, "
    "Tensor? negative_logprobs, Tensor? num_items_tensor"
)
OTHER_ARGS = ("float? num_items, float? logit_softcap, float? logit_scale, str backend, "
              "bool hidden_grad, bool weight_grad, bool bias_grad, bool shared_bias, "
              "int chunk_bytes")
SCHEMA = (f"({TENSOR_ARGS}, {OTHER_ARGS}, {_CONFIG_SCHEMA}) -> "
          "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
N_TENSOR_ARGS = 12
N_OTHER_ARGS = 9
N_ARGS = N_TENSOR_ARGS + N_OTHER_ARGS + len(CONFIG_FIELDS)


def config_args(cfg: UniSDConfig) -> list:
    """The op's config arguments, in CONFIG_FIELDS order."""
    return [getattr(cfg, name) for name in CONFIG_FIELDS]


def _backend(name: str):
    if name == "triton":
        from . import kernels

        return kernels
    return torch_backend.default_backend()


@torch.library.custom_op("unisd_fast::linear_loss", mutates_args=(), schema=SCHEMA)
def linear_loss_op(*args):
    (hs, ws, bs, ht, wt, bt, labels, views, view_lp, neg, neg_lp, items_t,
     items, softcap, scale, backend, want_h, want_w, want_b, shared_bias,
     chunk_bytes) = args[:N_TENSOR_ARGS + N_OTHER_ARGS]
    cfg = UniSDConfig(**dict(zip(CONFIG_FIELDS, args[N_TENSOR_ARGS + N_OTHER_ARGS:],
                                     strict=True)))
    V = ws.shape[0]
    check_labels(labels, V, cfg.ignore_index)
    if items_t is not None:
        check_num_items(items_t, items_t.device)
    B, T, H = hs.shape
    N = B * T
    call = LinearCall(
        backend=_backend(backend), config=cfg, logit_map=LogitMap(softcap, scale),
        student_head=Head(ws, bs),
        teacher_head=Head(ws if wt is None else wt, bs if shared_bias else bt),
        shared=wt is None and (shared_bias or bs is None and bt is None),
        student_rows=hs.reshape(N, H),
        teacher_rows=ht.reshape(N, ht.shape[-1]), labels=labels.reshape(N),
        chunk_bytes=chunk_bytes, grads=(want_h, want_w, want_b),
        vocab_tile=vocab_tile_for(hs.device))
    with torch.no_grad():
        result = linear_loss(
            call, (B, T), [v.reshape(N, v.shape[-1]) for v in views], view_lp,
            None if neg is None else neg.reshape(N, neg.shape[-1]), neg_lp, hs, ht,
            items_t if items_t is not None else items)
    t = result.terms
    none = hs.new_empty(0)
    return (t.loss, t.kd, t.contrastive, t.feature, t.divergence.clone(), t.weight, t.clipped,
            none if result.grad_hidden is None else result.grad_hidden,
            none.clone() if result.grad_weight is None else result.grad_weight,
            none.clone() if result.grad_bias is None else result.grad_bias)


@linear_loss_op.register_fake
def _fake(*args):
    hs, ws = args[0], args[1]
    want_h, want_w, want_b = args[16:19]
    B, T, _ = hs.shape
    scalar = hs.new_empty((), dtype=torch.float32)
    row = hs.new_empty((B, T), dtype=torch.float32)
    return (scalar, scalar.clone(), scalar.clone(), scalar.clone(), row, row.clone(),
            hs.new_empty((B, T), dtype=torch.bool),
            hs.new_empty(hs.shape) if want_h else hs.new_empty(0),
            ws.new_empty(ws.shape) if want_w else hs.new_empty(0),
            ws.new_empty(ws.shape[0]) if want_b else hs.new_empty(0))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[7:10])
    ctx.n_views = len(inputs[7])
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
    grads = [None] * N_ARGS
    grads[7] = [None] * ctx.n_views
    if grad_loss is None:
        return tuple(grads)
    grad_h, grad_w, grad_b = ctx.saved_tensors
    g = grad_loss.float()
    grads[0], grads[1], grads[2] = (_scaled(x, g) for x in (grad_h, grad_w, grad_b))
    return tuple(grads)


linear_loss_op.register_autograd(_backward, setup_context=_setup_context)
