"""Input checks of ``unisd_linear_loss``: every error names the argument and what was expected.

Only shapes, dtypes, devices and Python values are checked here (nothing that reads tensor
data, so a compiled caller's graph does not break); the label range and the value of a
tensor ``num_items_in_batch`` are checked inside the op.
"""

from __future__ import annotations

import math

import torch

from .validation import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_num_items,
    check_one_of,
    check_tensor,
    view_list,
)


def _check(name, x, shape, what, device, dtype=None, dtype_of=None):
    """x is a tensor of ``shape`` on ``device`` (and of ``dtype``, that of ``dtype_of``)."""
    check_tensor(name, x, FLOAT_DTYPES, "a floating-point")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got "
                         f"{tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but student_hidden is on {device}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of {dtype_of} ({dtype}), got {x.dtype}")


def _positive(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _views(view_hidden, B, T, Ht, device, dtype):
    views = view_list("view_hidden", view_hidden, B, T, Ht, "Ht")
    for k, v in enumerate(views):
        _check(f"view_hidden[{k}]", v, (B, T, Ht), "(B, T, Ht)", device, dtype,
               "teacher_weight")
    return views


def _num_items(num_items_in_batch, cfg, device):
    if num_items_in_batch is None:
        return
    if cfg.normalize != "token":
        raise ValueError("num_items_in_batch is only accepted with normalize='token'")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError("num_items_in_batch must be a scalar, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.device != device:
            raise ValueError(f"num_items_in_batch is on {num_items_in_batch.device} but "
                             f"student_hidden is on {device}")
    else:
        check_num_items(num_items_in_batch, device)


def validate_linear_inputs(cfg, student_hidden, student_weight, teacher_hidden, teacher_weight,
                           labels, student_bias, teacher_bias, view_hidden, view_logprobs,
                           negative_hidden, negative_logprobs, logit_softcap, logit_scale,
                           num_items_in_batch, chunk_bytes):
    """Check every input of ``unisd_linear_loss`` against the config. Returns the views as a
    list (or None), the soft-cap and the scale as floats (or None)."""
    check_tensor("student_hidden", student_hidden, FLOAT_DTYPES, "a floating-point")
    if student_hidden.dim() != 3 or min(student_hidden.shape) == 0:
        raise ValueError("student_hidden must have shape (B, T, H) with no empty dimension, "
                         f"got {tuple(student_hidden.shape)}")
    B, T, H = student_hidden.shape
    device, dtype = student_hidden.device, student_hidden.dtype
    check_tensor("student_weight", student_weight, FLOAT_DTYPES, "a floating-point")
    if student_weight.dim() != 2 or student_weight.shape[0] == 0:
        raise ValueError(f"student_weight must have shape (V, H) = (V, {H}), got "
                         f"{tuple(student_weight.shape)}")
    V = student_weight.shape[0]
    _check("student_weight", student_weight, (V, H), "(V, H)", device, dtype, "student_hidden")
    check_tensor("teacher_hidden", teacher_hidden, FLOAT_DTYPES, "a floating-point")
    if teacher_hidden.dim() != 3 or teacher_hidden.shape[-1] == 0:
        raise ValueError(f"teacher_hidden must have shape (B, T, Ht) = ({B}, {T}, Ht), got "
                         f"{tuple(teacher_hidden.shape)}")
    Ht = teacher_hidden.shape[-1]
    _check("teacher_hidden", teacher_hidden, (B, T, Ht), "(B, T, Ht)", device)
    _check("teacher_weight", teacher_weight, (V, Ht), "(V, Ht)", device, teacher_hidden.dtype,
           "teacher_hidden")
    if student_bias is not None:
        _check("student_bias", student_bias, (V,), "(V,)", device, dtype, "student_weight")
    if teacher_bias is not None:
        _check("teacher_bias", teacher_bias, (V,), "(V,)", device, teacher_weight.dtype,
               "teacher_weight")
    check_tensor("labels", labels, INT_DTYPES, "an integer")
    if tuple(labels.shape) != (B, T):
        raise ValueError(f"labels must have shape (B, T) = {(B, T)}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but student_hidden is on {device}")

    views = None
    if cfg.agreement != "none":
        check_one_of("view_hidden", "view_logprobs", view_hidden, view_logprobs,
                f"agreement={cfg.agreement!r}")
        if view_hidden is not None:
            views = _views(view_hidden, B, T, Ht, device, teacher_weight.dtype)
            K = len(views)
        else:
            check_tensor("view_logprobs", view_logprobs, FLOAT_DTYPES, "a floating-point")
            K = view_logprobs.shape[0] if view_logprobs.dim() == 3 else 0
            _check("view_logprobs", view_logprobs, (K, B, T), "(K, B, T)", device)
        if K < 2:
            raise ValueError(f"agreement={cfg.agreement!r} needs K >= 2 teacher views, got "
                             f"K={K}")
    if cfg.contrastive_weight > 0:
        check_one_of("negative_hidden", "negative_logprobs", negative_hidden, negative_logprobs,
                "contrastive_weight > 0")
        if negative_hidden is not None:
            _check("negative_hidden", negative_hidden, (B, T, Ht), "(B, T, Ht)", device,
                   teacher_weight.dtype, "teacher_weight")
        else:
            _check("negative_logprobs", negative_logprobs, (B, T), "(B, T)", device)
    if cfg.feature_weight > 0 and Ht != H:
        raise ValueError(f"feature_weight > 0 needs teacher_hidden with the student's hidden "
                         f"size H={H}, got Ht={Ht}")
    _num_items(num_items_in_batch, cfg, device)
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool)
                                    or not isinstance(chunk_bytes, int) or chunk_bytes <= 0):
        raise ValueError(f"chunk_bytes must be a positive int or None, got {chunk_bytes!r}")
    return views, _positive("logit_softcap", logit_softcap), _positive("logit_scale",
                                                                         logit_scale)
