"""``LinearHead``: an output layer ``logits = f(hidden @ weight.T + bias)``, with ``f`` the
optional logit scale, then the optional soft-cap (Cohere, Gemma-2): ``f(x) = cap * tanh(x *
scale / cap)``. The one definition of a head that the fused-linear loss, its reference, the
trainer and the TRL integration share (docs/api.md, "unisd_linear_loss")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearHead:
    """weight (V, H), optional bias (V,), optional softcap and scale (floats > 0)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    scale: float | None = None

    def map(self, x: torch.Tensor) -> torch.Tensor:
        """f(x), differentiable: ``x * scale``, then ``softcap * tanh(x / softcap)``."""
        if self.scale is not None:
            x = x * self.scale
        if self.softcap is not None:
            x = self.softcap * torch.tanh(x / self.softcap)
        return x

    def map_(self, x: torch.Tensor) -> None:
        """x <- f(x), in place (no autograd)."""
        if self.scale is not None:
            x.mul_(self.scale)
        if self.softcap is not None:
            x.div_(self.softcap).tanh_().mul_(self.softcap)

    def chain_(self, grad: torch.Tensor, z: torch.Tensor) -> None:
        """grad <- grad * f'(x) from the outputs z = f(x), in place; z is overwritten.
        f'(x) = scale * (1 - (z / softcap)^2) (each factor only where given)."""
        if self.softcap is not None:
            grad.mul_(z.div_(self.softcap).square_().neg_().add_(1.0))
        if self.scale is not None:
            grad.mul_(self.scale)

    def logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """f(hidden @ weight.T + bias), differentiable; the GEMM in the operands' dtype, f in
        ``dtype`` (default: the GEMM's)."""
        x = F.linear(hidden, self.weight, self.bias)
        return self.map(x if dtype is None else x.to(dtype))

    def to(self, dtype: torch.dtype) -> LinearHead:
        """This head with weight and bias in ``dtype`` (a differentiable cast)."""
        if self.weight.dtype == dtype:
            return self
        bias = None if self.bias is None else self.bias.to(dtype)
        return LinearHead(self.weight.to(dtype), bias, self.softcap, self.scale)

    def detached(self) -> LinearHead:
        """A copy that owns detached weights (for a sharded teacher, whose gathered head is
        freed after its forward)."""
        bias = None if self.bias is None else self.bias.detach().clone()
        return LinearHead(self.weight.detach().clone(), bias, self.softcap, self.scale)
