"""The PyTorch backend: the passes of the Triton kernels in PyTorch, over row blocks."""

from .backend import TorchBackend, TorchSettings, default_backend

__all__ = ["TorchBackend", "TorchSettings", "default_backend"]
