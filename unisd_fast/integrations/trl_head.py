"""The output layer of a causal LM as the fused-linear UniSD loss takes it (docs/trl.md): a
``unisd_fast.LinearHead`` (``logits = f(hidden @ weight.T + bias)``, with ``f`` the model's
logit scale and/or softcap), and the check that a model's logits really are that function of
its last hidden state."""

from __future__ import annotations

import torch
from torch import nn

from .. import LinearHead

MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(weight: torch.Tensor, mixed_precision: str) -> torch.dtype:
    """The dtype of the head GEMM: with mixed precision and float32 weights the
    mixed-precision dtype (as the model's own lm_head under autocast), else the weight's."""
    if weight.dtype == torch.float32 and mixed_precision in MIXED_PRECISION:
        return MIXED_PRECISION[mixed_precision]
    return weight.dtype


def output_head(model: nn.Module) -> LinearHead | str:
    """The LinearHead of an unwrapped causal LM, or why it has none usable (a string)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"its output layer is {type(head).__name__}, not a plain torch.nn.Linear"
    config = model.config.get_text_config()
    return LinearHead(
        weight=head.weight,
        bias=head.bias,
        softcap=getattr(config, "final_logit_softcapping", None),
        scale=getattr(config, "logit_scale", None),
    )


def head_mismatch(head: LinearHead, hidden: torch.Tensor, logits: torch.Tensor) -> str | None:
    """None when ``logits`` (N, V) equal ``head.logits(hidden)`` (N, H) to the rounding of
    the head's dtype, else a description of the difference."""
    ref = logits.float()
    wide = (torch.float32, torch.float64)
    precise = head.weight.dtype in wide and logits.dtype == head.weight.dtype
    tol = (1e-4 if precise else 3e-2) * (1 + ref.abs().max().item())
    diff = (head.logits(hidden.to(head.weight.dtype), torch.float32) - ref).abs().max().item()
    if diff <= tol:
        return None
    return (
        f"its logits differ from f(lm_head(last hidden state)) by up to {diff:.3g} "
        f"(tolerance {tol:.3g}): the model transforms its logits in a way not modelled here"
    )
