"""Inputs of the loss tests: the self-distillation regime on small shapes."""

import torch

import unisd_fast as usd
from unisd_fast.backends.pytorch import TorchBackend
from unisd_fast.backends.triton import TritonBackend

GRAD_SCALE = 1.7


def resolve_impl(impl):
    """``impl`` as unisd_loss takes it. "torch-stream" is a PyTorch backend with its
    small-input path off (``small_elements=0``), so that small test shapes run the streaming
    passes."""
    if impl == "torch-stream":
        return TorchBackend(small_elements=0)
    return impl


def with_settings(impl, torch=None, triton=None):
    """``impl`` ("torch", "triton" or a backend) as a backend whose settings take the
    changes ``torch`` (TorchSettings fields) or ``triton`` (TritonSettings fields)."""
    if impl == "triton" or isinstance(impl, TritonBackend):
        return TritonBackend(getattr(impl, "settings", None), **(triton or {}))
    return TorchBackend(getattr(impl, "settings", None), **(torch or {}))


def make_inputs(B, T, V, K=3, H=16, device="cpu", dtype=torch.float32, noise=0.5):
    """Teacher logits, a student near them, K views near them, an unrelated negative, hidden
    states and labels with ignored positions (one whole sequence ignored when B >= 3)."""
    teacher = torch.randn(B, T, V) * 2
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < 0.25] = -100
    labels[0, 0] = 1 % V
    if B >= 3:
        labels[1] = -100
    inputs = {
        "student_logits": teacher + noise * torch.randn(B, T, V),
        "teacher_logits": teacher,
        "labels": labels,
        "view_logits": teacher.unsqueeze(0) + 0.5 * torch.randn(K, B, T, V),
        "negative_logits": torch.randn(B, T, V) * 2,
        "student_hidden": torch.randn(B, T, H),
        "teacher_hidden": torch.randn(B, T, H),
    }
    return {k: v.to(device) if k == "labels" else v.to(device=device, dtype=dtype)
            for k, v in inputs.items()}


def run_loss(inputs, cfg, impl, upcast=False, grad_scale=GRAD_SCALE, **kw):
    """Forward and backward of ``grad_scale * loss``; returns (output, (d logits, d hidden))."""
    def cast(x):
        if x is None or not upcast or not torch.is_tensor(x) or not x.is_floating_point():
            return x
        return x.double()

    args = {}
    for key, value in inputs.items():
        args[key] = [cast(v) for v in value] if isinstance(value, list) else cast(value)
    z = args.pop("student_logits").clone().requires_grad_()
    h = args.pop("student_hidden").clone().requires_grad_()
    out = usd.unisd_loss(z, student_hidden=h, config=cfg, impl=impl, **args, **kw)
    (out.loss * grad_scale).backward()
    return out, (z.grad, h.grad)
