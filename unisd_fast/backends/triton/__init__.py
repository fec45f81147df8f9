"""The Triton backend: the stats, label and gradient kernels and their launchers (no
autograd here). Importing it decorates the kernels, for a GPU or, when TRITON_INTERPRET=1 is
set at that moment, for Triton's interpreter."""

from .backend import TritonBackend, TritonSettings, default_backend

__all__ = ["TritonBackend", "TritonSettings", "default_backend"]
