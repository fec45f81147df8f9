"""Input checks of ``unisd_loss``: every error names the argument and what was expected.

Checks of tensor *values* (the label range, a tensor ``num_items_in_batch``) never sync a CUDA
stream with the host: on CUDA they are device-side asserts whose failure surfaces at the next
synchronising call (docs/api.md, "Errors"); ``UNISD_FAST_SYNC_CHECKS=1`` checks on the host
instead, with the readable ``ValueError`` that CPU tensors always get.
"""

from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
HOST_LABELS = 4096


def check_tensor(name, x, dtypes, kind):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be {kind} tensor ({', '.join(map(str, dtypes))}), "
                        f"got {x.dtype}")


def _shape(name, x, expected, what):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, "
                         f"got {tuple(x.shape)}")


def _device(name, x, device):
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but student_logits is on {device}")


def _float_input(name, x, expected, what, device):
    check_tensor(name, x, FLOAT_DTYPES, "a floating-point")
    _shape(name, x, expected, what)
    _device(name, x, device)


def host_checks(device: torch.device) -> bool:
    """Whether value checks on ``device`` run on the host: always off CUDA, and on CUDA only
    under ``UNISD_FAST_SYNC_CHECKS=1`` (a host sync per call)."""
    return device.type != "cuda" or os.environ.get("UNISD_FAST_SYNC_CHECKS") == "1"


def _require(ok, message: str, found=None) -> None:
    """ValueError(message) where ``ok`` (a bool, or a 0-dim bool tensor) is False; ``found()``
    (on the host path only) names the offending value. A tensor on CUDA without host checks:
    an asynchronous device-side assert, raised by CUDA at the next sync (it ends the CUDA
    context)."""
    if isinstance(ok, torch.Tensor) and not host_checks(ok.device):
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message if found is None else f"{message}; found {found()}")


def check_labels(labels, V, ignore_index):
    """Every label in [0, V) or equal to ignore_index (a device-side assert on CUDA). Up to
    HOST_LABELS labels on the host path are checked as a Python list: one copy instead of
    five tensor ops, which at that size cost more than a small loss's compiled call."""
    message = f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}"
    if host_checks(labels.device) and labels.numel() <= HOST_LABELS:
        values = labels.flatten().tolist()
        kept = set(values) - {ignore_index}
        _require(not kept or (min(kept) >= 0 and max(kept) < V), message,
                 lambda: next(v for v in values if v != ignore_index and not 0 <= v < V))
        return
    kept = torch.where(labels == ignore_index, 0, labels)
    lo, hi = torch.aminmax(kept)
    _require((lo >= 0) & (hi < V), message,
             lambda: labels[(kept < 0) | (kept >= V)][0].item())


def check_num_items(n, device):
    """num_items_in_batch: a finite number > 0, or a one-element tensor holding one."""
    if isinstance(n, torch.Tensor):
        if n.dtype == torch.bool or n.is_complex():
            raise TypeError(f"num_items_in_batch must be a real number tensor, got {n.dtype}")
        if n.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(n.shape)}")
        _device("num_items_in_batch", n, device)
        _require((torch.isfinite(n) & (n > 0)).all(),
                 "num_items_in_batch must be > 0 and finite", lambda: n.item())
    elif isinstance(n, bool) or not isinstance(n, (int, float)):
        raise TypeError("num_items_in_batch must be a number or a scalar tensor, got "
                        f"{type(n).__name__}")
    elif not (math.isfinite(n) and n > 0):
        raise ValueError(f"num_items_in_batch must be > 0 and finite, got {n}")


def _overlaps(x) -> bool:
    """True where two elements of ``x`` may share memory (a 0 stride, as after ``expand``,
    or strides too small for the sizes): sorted by stride, each dimension must step past
    the whole extent of the smaller ones."""
    extent = 0
    pairs = zip(x.stride(), x.shape, strict=True)
    for stride, size in sorted((st, n) for st, n in pairs if n > 1):
        if stride <= extent:
            return True
        extent += (size - 1) * stride
    return False


def validate_inplace(student_logits) -> None:
    """inplace_backward=True writes the gradient into student_logits' own memory, so no two
    of its elements may share memory."""
    if _overlaps(student_logits):
        raise ValueError(
            "inplace_backward=True needs student_logits whose elements do not share memory; "
            f"got shape {tuple(student_logits.shape)} with strides {student_logits.stride()} "
            "(an expand()ed or overlapping view); pass student_logits.contiguous() or "
            "inplace_backward=False"
        )


def check_one_of(first, second, first_x, second_x, needed_for):
    if first_x is not None and second_x is not None:
        raise ValueError(f"give either {first} or {second}, not both")
    if first_x is None and second_x is None:
        raise ValueError(f"{needed_for} needs {first} or {second}")


def view_list(name, views, B, T, last, last_name):
    """``views`` as a list: a (K, B, T, last) tensor or a list of K (B, T, last) tensors;
    errors name ``name`` and the expected shape. Each view is checked by the caller."""
    if isinstance(views, torch.Tensor):
        check_tensor(name, views, FLOAT_DTYPES, "a floating-point")
        if views.dim() != 4:
            raise ValueError(f"{name} must have shape (K, B, T, {last_name}) = "
                             f"(K, {B}, {T}, {last}), got {tuple(views.shape)}")
        return list(views.unbind(0))
    if isinstance(views, (list, tuple)):
        return list(views)
    raise TypeError(f"{name} must be a (K, B, T, {last_name}) tensor or a list of K "
                    f"(B, T, {last_name}) tensors, got {type(views).__name__}")


def _views(view_logits, B, T, V, device):
    views = view_list("view_logits", view_logits, B, T, V, "V")
    for k, v in enumerate(views):
        _float_input(f"view_logits[{k}]", v, (B, T, V), "(B, T, V)", device)
    return views


def validate_inputs(cfg, student_logits, teacher_logits, labels, view_logits, view_logprobs,
                    negative_logits, negative_logprobs, student_hidden, teacher_hidden,
                    num_items_in_batch):
    """Check every input against the config; returns the views as a list (or None)."""
    check_tensor("student_logits", student_logits, FLOAT_DTYPES, "a floating-point")
    if student_logits.dim() != 3 or min(student_logits.shape) == 0:
        raise ValueError("student_logits must have shape (B, T, V) with no empty dimension, "
                         f"got {tuple(student_logits.shape)}")
    B, T, V = student_logits.shape
    device = student_logits.device
    _float_input("teacher_logits", teacher_logits, (B, T, V), "(B, T, V)", device)
    check_tensor("labels", labels, INT_DTYPES, "an integer")
    _shape("labels", labels, (B, T), "(B, T)")
    _device("labels", labels, device)
    check_labels(labels, V, cfg.ignore_index)

    views = None
    if cfg.agreement != "none":
        check_one_of("view_logits", "view_logprobs", view_logits, view_logprobs,
                f"agreement={cfg.agreement!r}")
        if view_logits is not None:
            views = _views(view_logits, B, T, V, device)
            K = len(views)
        else:
            check_tensor("view_logprobs", view_logprobs, FLOAT_DTYPES, "a floating-point")
            if view_logprobs.dim() != 3:
                raise ValueError(f"view_logprobs must have shape (K, B, T) = (K, {B}, {T}), "
                                 f"got {tuple(view_logprobs.shape)}")
            K = view_logprobs.shape[0]
            _float_input("view_logprobs", view_logprobs, (K, B, T), "(K, B, T)", device)
        if K < 2:
            raise ValueError(f"agreement={cfg.agreement!r} needs K >= 2 teacher views, got "
                             f"K={K}")

    if cfg.contrastive_weight > 0:
        check_one_of("negative_logits", "negative_logprobs", negative_logits, negative_logprobs,
                "contrastive_weight > 0")
        if negative_logits is not None:
            _float_input("negative_logits", negative_logits, (B, T, V), "(B, T, V)", device)
        else:
            _float_input("negative_logprobs", negative_logprobs, (B, T), "(B, T)", device)

    if cfg.feature_weight > 0:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError("feature_weight > 0 needs student_hidden and teacher_hidden "
                             "(B, T, H)")
        check_tensor("student_hidden", student_hidden, FLOAT_DTYPES, "a floating-point")
        if student_hidden.dim() != 3 or student_hidden.shape[-1] == 0:
            raise ValueError(f"student_hidden must have shape (B, T, H) = ({B}, {T}, H), "
                             f"got {tuple(student_hidden.shape)}")
        H = student_hidden.shape[-1]
        _float_input("student_hidden", student_hidden, (B, T, H), "(B, T, H)", device)
        _float_input("teacher_hidden", teacher_hidden, (B, T, H), "(B, T, H)", device)

    if num_items_in_batch is not None:
        if cfg.normalize != "token":
            raise ValueError("num_items_in_batch is only accepted with normalize='token'")
        check_num_items(num_items_in_batch, device)
    return views
