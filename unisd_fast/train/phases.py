"""Wall time of the phases of a training step (the step ledger of benchmarks/step_ledger.py).

``StepSetup.timer`` is a ``PhaseTimer`` or None (no timing, no synchronisation). Each timed
phase synchronises the device before it starts and after it ends, so on CUDA a phase's time
is its kernels' and not whatever was queued before it.
"""

from __future__ import annotations

import contextlib
import time

import torch


class PhaseTimer:
    """Seconds per phase name, summed over every time the phase ran."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def phase(timer: PhaseTimer | None, name: str):
    """``timer(name)``, or a context that does nothing without a timer."""
    return contextlib.nullcontext() if timer is None else timer(name)
