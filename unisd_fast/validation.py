"""Input checks of both loss forms, ``unisd_loss`` (logits in) and ``unisd_linear_loss``
(hidden states and heads in): every error names the argument and what was expected.

One core (``Inputs``: a tensor's type, shape, device and dtype against the first input; the
views, the negative and ``num_items_in_batch`` of the options the config switches on) and an
entry point per form. Only shapes, dtypes, devices and Python values are checked here; the
values of tensors (the label range, a tensor ``num_items_in_batch``) are checked by
``ops.checks``: here for the logits form, inside the operator for the fused-linear one (so
that a compiled caller's graph does not break).
"""

from __future__ import annotations

import math

import torch

from .config import SUPPORT_MASS_SLACK, UniSDConfig
from .ops.checks import check_labels, check_num_items_value, check_support

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_config(config) -> UniSDConfig:
    """``config``, or the default config for None; a TypeError for anything else."""
    cfg = UniSDConfig() if config is None else config
    if not isinstance(cfg, UniSDConfig):
        raise TypeError(f"config must be a UniSDConfig, got {type(cfg).__name__}")
    return cfg


def check_tensor(name, x, dtypes, kind):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be {kind} tensor ({', '.join(map(str, dtypes))}), "
                        f"got {x.dtype}")


def check_positive(name, value):
    """A finite number > 0 as a float, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_one_of(first, second, first_x, second_x, needed_for):
    if first_x is not None and second_x is not None:
        raise ValueError(f"give either {first} or {second}, not both")
    if first_x is None and second_x is None:
        raise ValueError(f"{needed_for} needs {first} or {second}")


class Inputs:
    """Checks of the inputs of one call against its first input ``anchor`` (B, T, ...):
    the batch and time sizes and the device every other tensor must share."""

    def __init__(self, anchor: str, x, last_name: str):
        check_tensor(anchor, x, FLOAT_DTYPES, "a floating-point")
        if x.dim() != 3 or min(x.shape) == 0:
            raise ValueError(f"{anchor} must have shape (B, T, {last_name}) with no empty "
                             f"dimension, got {tuple(x.shape)}")
        self.anchor, self.device = anchor, x.device
        self.B, self.T = x.shape[:2]

    def tensor(self, name, x, shape, what, dtype=None, dtype_of=None):
        """x: a floating-point tensor of ``shape`` on the anchor's device (and of ``dtype``,
        that of the input ``dtype_of``)."""
        check_tensor(name, x, FLOAT_DTYPES, "a floating-point")
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got "
                             f"{tuple(x.shape)}")
        self.same_device(name, x)
        if dtype is not None and x.dtype != dtype:
            raise TypeError(f"{name} must have the dtype of {dtype_of} ({dtype}), got "
                            f"{x.dtype}")

    def same_device(self, name, x):
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but {self.anchor} is on {self.device}")

    def last_size(self, name, x, last_name):
        """The last size of a (B, T, last) tensor, checked to be 3-D and non-empty."""
        check_tensor(name, x, FLOAT_DTYPES, "a floating-point")
        if x.dim() != 3 or x.shape[-1] == 0:
            raise ValueError(f"{name} must have shape (B, T, {last_name}) = ({self.B}, "
                             f"{self.T}, {last_name}), got {tuple(x.shape)}")
        return x.shape[-1]

    def labels(self, labels):
        check_tensor("labels", labels, INT_DTYPES, "an integer")
        if tuple(labels.shape) != (self.B, self.T):
            raise ValueError(f"labels must have shape (B, T) = {(self.B, self.T)}, got "
                             f"{tuple(labels.shape)}")
        self.same_device("labels", labels)

    def views(self, name, views, last, last_name, dtype=None, dtype_of=None) -> list:
        """A (K, B, T, last) tensor or a list of K (B, T, last) tensors, as a list."""
        B, T = self.B, self.T
        if isinstance(views, torch.Tensor):
            check_tensor(name, views, FLOAT_DTYPES, "a floating-point")
            if views.dim() != 4:
                raise ValueError(f"{name} must have shape (K, B, T, {last_name}) = "
                                 f"(K, {B}, {T}, {last}), got {tuple(views.shape)}")
            views = list(views.unbind(0))
        elif isinstance(views, (list, tuple)):
            views = list(views)
        else:
            raise TypeError(f"{name} must be a (K, B, T, {last_name}) tensor or a list of K "
                            f"(B, T, {last_name}) tensors, got {type(views).__name__}")
        for k, v in enumerate(views):
            self.tensor(f"{name}[{k}]", v, (B, T, last), f"(B, T, {last_name})", dtype,
                        dtype_of)
        return views

    def options(self, cfg, views, view_logprobs, negative, negative_logprobs, *, last,
                last_name, dtype=None, dtype_of=None):
        """The inputs of the terms the config switches on: ``views`` and ``negative`` are
        (name, value) pairs of (B, T, last) inputs (of ``dtype``). Returns the views as a
        list, or None."""
        out = None
        if cfg.agreement != "none":
            check_one_of(views[0], "view_logprobs", views[1], view_logprobs,
                         f"agreement={cfg.agreement!r}")
            if views[1] is not None:
                out = self.views(*views, last, last_name, dtype, dtype_of)
                K = len(out)
            else:
                check_tensor("view_logprobs", view_logprobs, FLOAT_DTYPES, "a floating-point")
                K = view_logprobs.shape[0] if view_logprobs.dim() == 3 else 0
                if K == 0:
                    raise ValueError(f"view_logprobs must have shape (K, B, T) = (K, {self.B}, "
                                     f"{self.T}), got {tuple(view_logprobs.shape)}")
                self.tensor("view_logprobs", view_logprobs, (K, self.B, self.T), "(K, B, T)")
            if K < 2:
                raise ValueError(f"agreement={cfg.agreement!r} needs K >= 2 teacher views, "
                                 f"got K={K}")
        if cfg.contrastive_weight > 0:
            check_one_of(negative[0], "negative_logprobs", negative[1], negative_logprobs,
                         "contrastive_weight > 0")
            if negative[1] is not None:
                self.tensor(negative[0], negative[1], (self.B, self.T, last),
                            f"(B, T, {last_name})", dtype, dtype_of)
            else:
                self.tensor("negative_logprobs", negative_logprobs, (self.B, self.T), "(B, T)")
        return out

    def view_mask(self, cfg, view_mask):
        """view_mask: None, or a (B, T) bool tensor (the positions the views scored), only
        with agreement."""
        if view_mask is None:
            return
        if cfg.agreement == "none":
            raise ValueError("view_mask is only accepted with agreement='token' or 'sequence'")
        if not isinstance(view_mask, torch.Tensor) or view_mask.dtype != torch.bool:
            raise TypeError(f"view_mask must be a torch.bool tensor, got "
                            f"{getattr(view_mask, 'dtype', type(view_mask).__name__)}")
        if tuple(view_mask.shape) != (self.B, self.T):
            raise ValueError(f"view_mask must have shape (B, T) = {(self.B, self.T)}, got "
                             f"{tuple(view_mask.shape)}")
        self.same_device("view_mask", view_mask)

    def old_logprobs(self, cfg, old_logprobs):
        """old_logprobs (B, T): given exactly when the config has an importance_clip."""
        if cfg.importance_clip is None:
            if old_logprobs is not None:
                raise ValueError("old_logprobs needs UniSDConfig.importance_clip")
            return
        if old_logprobs is None:
            raise ValueError("UniSDConfig.importance_clip needs old_logprobs (B, T), the "
                             "student's label log-probs when the rollout was sampled")
        self.tensor("old_logprobs", old_logprobs, (self.B, self.T), "(B, T)")

    def num_items(self, cfg, n, check_value: bool):
        """num_items_in_batch: a finite number > 0, or a one-element tensor holding one
        (its value checked here only when ``check_value``)."""
        if n is None:
            return
        if cfg.normalize != "token":
            raise ValueError("num_items_in_batch is only accepted with normalize='token'")
        if isinstance(n, torch.Tensor):
            if n.dtype == torch.bool or n.is_complex():
                raise TypeError(f"num_items_in_batch must be a real number tensor, got "
                                f"{n.dtype}")
            if n.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a scalar, got shape "
                                 f"{tuple(n.shape)}")
            self.same_device("num_items_in_batch", n)
            if check_value:
                check_num_items_value(n)
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


def validate_support(cfg, inputs, V, labels, teacher_indices, teacher_logprobs,
                     teacher_label_logprobs, check_values: bool = True) -> int | None:
    """The sparse support's inputs: ``config.topk`` (at most V) or a given support
    (``teacher_indices`` (B, T, k) integers, ``teacher_logprobs`` (B, T, k), optionally
    ``teacher_label_logprobs`` (B, T)), with their values (``check_values``). Returns k,
    or None for the full vocabulary."""
    given = [n for n, x in (("teacher_indices", teacher_indices),
                            ("teacher_logprobs", teacher_logprobs),
                            ("teacher_label_logprobs", teacher_label_logprobs)) if x is not None]
    if teacher_indices is None:
        if given:
            raise ValueError(f"{given[0]} needs teacher_indices and teacher_logprobs")
        if cfg.topk is not None and cfg.topk > V:
            raise ValueError(f"UniSDConfig.topk must be <= the vocabulary size V={V}, got "
                             f"{cfg.topk}")
        return cfg.topk
    if cfg.topk is not None:
        raise ValueError("teacher_indices gives the support: UniSDConfig.topk must be None, "
                         f"got {cfg.topk}")
    if teacher_logprobs is None:
        raise ValueError("teacher_indices needs teacher_logprobs (B, T, k)")
    check_tensor("teacher_indices", teacher_indices, INT_DTYPES, "an integer")
    B, T = inputs.B, inputs.T
    if teacher_indices.dim() != 3 or tuple(teacher_indices.shape[:2]) != (B, T) \
            or teacher_indices.shape[-1] == 0:
        raise ValueError(f"teacher_indices must have shape (B, T, k) = ({B}, {T}, k), k >= 1, "
                         f"got {tuple(teacher_indices.shape)}")
    inputs.same_device("teacher_indices", teacher_indices)
    k = teacher_indices.shape[-1]
    if k > V:
        raise ValueError(f"teacher_indices must hold k <= V={V} indices per row, got k={k}")
    inputs.tensor("teacher_logprobs", teacher_logprobs, (B, T, k), "(B, T, k)")
    if teacher_label_logprobs is not None:
        inputs.tensor("teacher_label_logprobs", teacher_label_logprobs, (B, T), "(B, T)")
    if check_values:
        check_support(teacher_indices, teacher_logprobs, labels, V, cfg.ignore_index,
                      SUPPORT_MASS_SLACK,
                      cfg.contrastive_weight > 0 and teacher_label_logprobs is None)
    return k


def validate_inputs(cfg, student_logits, teacher_logits, labels, view_logits, view_logprobs,
                    negative_logits, negative_logprobs, student_hidden, teacher_hidden,
                    num_items_in_batch, given_support: bool = False,
                    view_mask=None, label_vocab: int | None = None, old_logprobs=None):
    """Check every input of ``unisd_loss`` against the config; returns the views as a list
    (or None). ``given_support``: the teacher is a given sparse support, teacher_logits must
    be None. ``label_vocab``: the vocabulary of the labels where the logits are a shard of
    it (default: the logits' V)."""
    inputs = Inputs("student_logits", student_logits, "V")
    B, T, V = student_logits.shape
    if given_support:
        if teacher_logits is not None:
            raise ValueError("give teacher_logits or teacher_indices, not both")
    else:
        inputs.tensor("teacher_logits", teacher_logits, (B, T, V), "(B, T, V)")
    inputs.labels(labels)
    check_labels(labels, label_vocab or V, cfg.ignore_index)
    views = inputs.options(cfg, ("view_logits", view_logits), view_logprobs,
                           ("negative_logits", negative_logits), negative_logprobs,
                           last=V, last_name="V")
    inputs.view_mask(cfg, view_mask)
    if cfg.feature_weight > 0:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError("feature_weight > 0 needs student_hidden and teacher_hidden "
                             "(B, T, H)")
        H = inputs.last_size("student_hidden", student_hidden, "H")
        inputs.tensor("student_hidden", student_hidden, (B, T, H), "(B, T, H)")
        inputs.tensor("teacher_hidden", teacher_hidden, (B, T, H), "(B, T, H)")
    inputs.num_items(cfg, num_items_in_batch, check_value=True)
    inputs.old_logprobs(cfg, old_logprobs)
    return views


def validate_linear_inputs(cfg, student_hidden, student_weight, teacher_hidden, teacher_weight,
                           labels, student_bias, teacher_bias, view_hidden, view_logprobs,
                           negative_hidden, negative_logprobs, logit_softcap, logit_scale,
                           num_items_in_batch, chunk_bytes, given_support: bool = False,
                           view_mask=None, old_logprobs=None):
    """Check every input of ``unisd_linear_loss`` against the config. Returns the views as a
    list (or None), the soft-cap and the scale as floats (or None). ``given_support``: the
    teacher is a given sparse support; its hidden states and head are then optional (only
    feature matching and views or negative given as hidden states use them)."""
    if given_support and teacher_weight is None:
        for name, x in (("view_hidden", view_hidden), ("negative_hidden", negative_hidden),
                        ("teacher_bias", teacher_bias)):
            if x is not None:
                raise ValueError(f"{name} needs teacher_weight (the head that scores it)")
    if given_support and (teacher_hidden is None or teacher_weight is None):
        if cfg.feature_weight > 0 and teacher_hidden is None:
            raise ValueError("feature_weight > 0 needs teacher_hidden (B, T, H)")
        stand_in = student_hidden if teacher_hidden is None else teacher_hidden
        teacher_weight = student_weight if teacher_weight is None else teacher_weight
        if teacher_hidden is not None and teacher_hidden.shape[-1] != student_weight.shape[-1] \
                and teacher_weight is student_weight:
            raise ValueError("teacher_hidden with a hidden size other than the student's "
                             "needs teacher_weight")
        teacher_hidden = stand_in
    inputs = Inputs("student_hidden", student_hidden, "H")
    B, T, H = student_hidden.shape
    dtype = student_hidden.dtype
    check_tensor("student_weight", student_weight, FLOAT_DTYPES, "a floating-point")
    if student_weight.dim() != 2 or student_weight.shape[0] == 0:
        raise ValueError(f"student_weight must have shape (V, H) = (V, {H}), got "
                         f"{tuple(student_weight.shape)}")
    V = student_weight.shape[0]
    inputs.tensor("student_weight", student_weight, (V, H), "(V, H)", dtype, "student_hidden")
    Ht = inputs.last_size("teacher_hidden", teacher_hidden, "Ht")
    inputs.tensor("teacher_hidden", teacher_hidden, (B, T, Ht), "(B, T, Ht)")
    t_dtype = teacher_hidden.dtype
    inputs.tensor("teacher_weight", teacher_weight, (V, Ht), "(V, Ht)", t_dtype,
                  "teacher_hidden")
    if student_bias is not None:
        inputs.tensor("student_bias", student_bias, (V,), "(V,)", dtype, "student_weight")
    if teacher_bias is not None:
        inputs.tensor("teacher_bias", teacher_bias, (V,), "(V,)", teacher_weight.dtype,
                      "teacher_weight")
    inputs.labels(labels)
    views = inputs.options(cfg, ("view_hidden", view_hidden), view_logprobs,
                           ("negative_hidden", negative_hidden), negative_logprobs,
                           last=Ht, last_name="Ht", dtype=teacher_weight.dtype,
                           dtype_of="teacher_weight")
    inputs.view_mask(cfg, view_mask)
    if cfg.feature_weight > 0 and Ht != H:
        raise ValueError(f"feature_weight > 0 needs teacher_hidden with the student's hidden "
                         f"size H={H}, got Ht={Ht}")
    inputs.num_items(cfg, num_items_in_batch, check_value=False)
    inputs.old_logprobs(cfg, old_logprobs)
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool)
                                    or not isinstance(chunk_bytes, int) or chunk_bytes <= 0):
        raise ValueError(f"chunk_bytes must be a positive int or None, got {chunk_bytes!r}")
    return (views, check_positive("logit_softcap", logit_softcap),
            check_positive("logit_scale", logit_scale))
