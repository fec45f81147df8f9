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
        """f(hidden @ weight.T + bias) in float32: the scale first, then the softcap."""
        bias = None if self.bias is None else self.bias.float()
        out = nn.functional.linear(hidden.float(), self.weight.float(), bias)
        if self.scale is not None:
            out = out * self.scale
        if self.softcap is not None:
            out = self.softcap * torch.tanh(out / self.softcap)
        return out


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
    their dtype, else a description of the difference."""
    ref = logits.float()
    tol = (1e-4 if logits.dtype == torch.float32 else 2e-2) * (1 + ref.abs().max().item())
    diff = (head.logits(hidden) - ref).abs().max().item()
    if diff <= tol:
        return None
    return (
        f"its logits differ from f(lm_head(last hidden state)) by up to {diff:.3g} "
        f"(tolerance {tol:.3g}): the model transforms its logits in a way not modelled here"
    )
