"""What the peer suites' cases share: our loss and logits gradient, and the share of a peer's
tolerance (atol + rtol |truth|, elementwise) that our distance to float64 uses."""

import torch

import unisd_fast as usd
from unisd_fast.backends.pytorch import TorchBackend

IMPLS = {"torch": "torch", "torch-stream": TorchBackend(small_elements=0)}


def loss_and_grad(student, teacher, labels, cfg, impl, scale=1.0, **kw):
    """(loss, d (scale * loss) / d student) of ``unisd_loss``; float64 inputs give float64."""
    z = student.clone().requires_grad_()
    impl = "reference" if student.dtype == torch.float64 else IMPLS[impl]
    out = usd.unisd_loss(z, teacher, labels, config=cfg, impl=impl, **kw)
    (out.loss * scale).backward()
    return out.loss.detach(), z.grad


def share_of_tolerance(student, teacher, labels, cfg, impl, atol, rtol, scale=1.0, **kw):
    """max over the loss and every gradient element of |ours - float64| / (atol + rtol
    |float64|), for (loss, gradient)."""
    ours = loss_and_grad(student, teacher, labels, cfg, impl, scale, **kw)
    exact = loss_and_grad(student.double(), teacher.double(), labels, cfg, impl, scale, **kw)
    return tuple(((a.double() - b).abs() / (atol + rtol * b.abs())).max().item()
                 for a, b in zip(ours, exact, strict=True))
