"""The compile runner of the PyTorch backend: ``torch.compile`` of the block functions, with
an eager fallback, and the run-time scalars as 0-dim tensors.

Compile state lives in a ``Compiler`` instance. Run-time scalars (tau, alpha) enter the
compiled functions as 0-dim tensors and each divergence has its own function
(``specialise``), so a process compiles at most one graph per (function, dtype, vocabulary
size) and never recompiles for a new temperature or mixing weight.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch

from .aot import AotFunctions

SCALAR_CACHE_SIZE = 64
# Inductor stores a pointwise result of more than 30 ops that feeds a reduction as a
# block-sized buffer and reads it back (its default realize_opcount_threshold); the shifted
# sums of the stats pass are such results. Fused in the reduction loop instead, a stats pass
# over a 55 x 152k block takes 17 ms instead of 30 ms and allocates no block-sized buffer.
INDUCTOR_OPTIONS = {"realize_opcount_threshold": 1000}


def specialise(fn: Callable, **constants) -> Callable:
    """``fn(*args, **constants)`` as a function with a code object of its own. Dynamo keeps
    its compiled graphs (and their recompile limit) per code object, so each specialisation
    of ``fn`` (one per divergence, say) compiles and caches apart."""

    def bound(*args):
        return fn(*args, **constants)

    name = "_".join([fn.__name__, *map(str, constants.values())])
    code = bound.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, bound.__globals__, name, None, bound.__closure__)


class Compiler:
    """Runs functions on 2-D row blocks, compiled with ``torch.compile(backend=compiler)``
    when ``enabled``. Blocks under ``min_elements`` run eagerly: there compiling costs more
    than it saves. A compiler that fails at run time turns this instance eager for good, with
    one ``RuntimeWarning``. With ``ahead_of_time`` (a registry "module:attribute" of block
    functions, see ``aot.AotFunctions``) and the inductor compiler, those functions run from
    packages built in a subprocess instead, where a package can serve the call; everything
    else (the whole-loss call of small inputs, a non-contiguous block) through torch.compile."""

    def __init__(self, enabled: bool, compiler="inductor", min_elements: int = 1 << 12,
                 ahead_of_time: str | None = None):
        self.enabled = enabled
        self.min_elements = min_elements
        inductor = compiler == "inductor"
        self.compile_args = {"backend": compiler,
                             "options": INDUCTOR_OPTIONS if inductor else None}
        self.aot = AotFunctions(ahead_of_time, INDUCTOR_OPTIONS) \
            if ahead_of_time and inductor else None
        self._compiled: dict = {}
        self._scalars: dict = {}

    def compiled(self, fn: Callable) -> Callable:
        """The compiled form of ``fn`` (made on first use)."""
        if fn not in self._compiled:
            self._compiled[fn] = torch.compile(fn, **self.compile_args)
        return self._compiled[fn]

    def run(self, fn: Callable, *args, mark_rows: bool = True):
        """``fn(*args)``, compiled with a dynamic row count where possible (rows marked
        dynamic unless ``mark_rows`` is False: then dynamo makes a size dynamic when it first
        changes, one recompile)."""
        if not self.enabled or args[0].numel() < self.min_elements:
            return fn(*args)
        if self.aot is not None:
            try:
                runner = self.aot.runner(fn, args)
                if runner is not None:
                    return runner(*args)
            except Exception as error:  # noqa: BLE001 - a package failing at run time
                warnings.warn(f"unisd_fast: an ahead-of-time compiled pass failed "
                              f"({type(error).__name__}: {error}); torch.compile from now on",
                              RuntimeWarning, stacklevel=3)
                self.aot = None
        for a in args if mark_rows else ():
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        try:
            return self.compiled(fn)(*args)
        except Exception as error:  # noqa: BLE001 - a compiler failing at run time: go eager
            warnings.warn(f"unisd_fast: torch.compile failed ({type(error).__name__}: "
                          f"{error}); the CPU path runs eagerly from now on", RuntimeWarning,
                          stacklevel=3)
            self.enabled = False
            return fn(*args)

    def scalar(self, value: float, like: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``value`` as a 0-dim ``dtype`` tensor on ``like``'s device, made once per value."""
        key = (value, like.device, dtype)
        out = self._scalars.get(key)
        if out is None:
            if len(self._scalars) >= SCALAR_CACHE_SIZE:
                self._scalars.clear()
            out = self._scalars[key] = torch.tensor(value, dtype=dtype, device=like.device)
        return out
