"""The output layer of a causal LM as the fused-linear UniSD loss takes it (docs/trl.md):
``logits = f(hidden @ weight.T + bias)``, with ``f`` the model's logit scale and/or softcap,
and the check that a model's logits really are that function of its last hidden state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LinearHead:
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    scale: float | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """f(hidden @ weight.T + bias): the GEMM in the weight's dtype, f in float32 (the
        scale first, then the softcap)."""
        out = nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()
        if self.scale is not None:
            out = out * self.scale
        if self.softcap is not None:
            out = self.softcap * torch.tanh(out / self.softcap)
        return out

    def cast(self, dtype: torch.dtype) -> LinearHead:
        """This head with weight and bias in ``dtype`` (a differentiable cast)."""
        if self.weight.dtype == dtype:
            return self
        bias = None if self.bias is None else self.bias.to(dtype)
        return LinearHead(self.weight.to(dtype), bias, self.softcap, self.scale)


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
    diff = (head.logits(hidden) - ref).abs().max().item()
    if diff <= tol:
        return None
    return (
        f"its logits differ from f(lm_head(last hidden state)) by up to {diff:.3g} "
        f"(tolerance {tol:.3g}): the model transforms its logits in a way not modelled here"
    )
