"""Triton kernels of the UniSD loss and their launchers (no autograd here)."""

from .grad import write_grad
from .stats import label_logprob, row_stats

__all__ = ["label_logprob", "row_stats", "write_grad"]
