"""``TorchBackend``: the ``RowBackend`` of the PyTorch passes over blocks of rows (the CPU
path, ``impl="torch"``).

The same stats and gradient passes as the Triton kernels, but each pass works on a block of
rows at a time, so no float32 tokens x vocab temporary is alive beyond one block (about
``chunk_elements`` elements; compiled, none but two in the jsd stats pass: the compiler fuses
each pass into one loop) and the gradient itself. Inputs of at most ``small_elements`` logits
that need a gradient take one call instead (``row_stats_and_grad``). docs/kernels.md, "The
CPU backend", describes the passes; ``TorchSettings`` holds every size this backend chooses
by.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from ...config import DIVERGENCES
from ..protocol import STACK_ELEMENTS, RowStats
from . import passes, sparse
from .compiler import Compiler, specialise
from .rows import Rows, same_view


@dataclasses.dataclass(frozen=True)
class TorchSettings:
    """The sizes and switches of a ``TorchBackend``.

    compile: compile the passes with ``torch.compile`` (None: ``UNISD_FAST_COMPILE``, on
        unless it is "0"); ``compiler``: the torch.compile backend.
    ahead_of_time: with the inductor compiler, run the block functions from packages that
        AOTInductor builds in a subprocess (``aot.py``: no compiler in this process, one
        package per function, input dtypes and vocabulary size, cached on disk); None:
        ``UNISD_FAST_AOT``, on unless it is "0".
    chunk_elements / chunk_elements_eager: logits per row block, compiled / eager.
    compile_min_elements: smaller blocks run eagerly (compiling costs more than it saves).
    small_elements: up to this many logits the forward also computes the divergence gradient
        (one compiled call instead of two, the backward a scaling): below it the per-call
        overhead, not the logits traffic, sets the time, and the extra float32 tokens x vocab
        tensor is at most 4 MiB.
    stack_elements: views of at most this many logits in all are scored in one call.
    cpu_vocab_tile: head rows per vocabulary tile of the fused-linear chunks on CPU (None:
        whole-head GEMMs, as on every other device).
    """

    compile: bool | None = None
    compiler: object = "inductor"
    ahead_of_time: bool | None = None
    chunk_elements: int = 1 << 24
    chunk_elements_eager: int = 1 << 22
    compile_min_elements: int = 1 << 12
    small_elements: int = 1 << 20
    stack_elements: int = STACK_ELEMENTS
    cpu_vocab_tile: int | None = 1024


def _per_divergence(fn, **constants):
    return {d: specialise(fn, divergence=d, **constants) for d in DIVERGENCES}


STATS = _per_divergence(passes.stats)
STATS_GRADS = _per_divergence(passes.stats_grad)
STATS_GRADS_SHIFTED = {d: specialise(passes.stats_grad_shifted, divergence=d)
                       for d in ("fkl", "rkl")}
GRADS = _per_divergence(passes.grad)
GRADS_INTO_Z = _per_divergence(passes.grad_into, target="z")
GRADS_INTO_U = _per_divergence(passes.grad_into, target="u")
BLOCK_FUNCTIONS = (*STATS.values(), *STATS_GRADS.values(), *STATS_GRADS_SHIFTED.values(),
                   *GRADS.values(), *GRADS_INTO_Z.values(), *GRADS_INTO_U.values(),
                   passes.label_block)
BLOCKS = f"{__name__}:BLOCK_FUNCTIONS"  # the registry of the ahead-of-time builds


class TorchBackend:
    """The PyTorch ``RowBackend``: per-block passes, compiled per instance.
    ``TorchBackend(settings)`` or ``TorchBackend(**fields of TorchSettings)``."""

    def __init__(self, settings: TorchSettings | None = None, **changes):
        settings = dataclasses.replace(settings or TorchSettings(), **changes)
        enabled = settings.compile
        if enabled is None:
            enabled = os.environ.get("UNISD_FAST_COMPILE", "1") != "0"
        aot = settings.ahead_of_time
        if aot is None:
            aot = os.environ.get("UNISD_FAST_AOT", "1") != "0"
        self.settings = settings
        self.compiler = Compiler(enabled, settings.compiler, settings.compile_min_elements,
                                 ahead_of_time=BLOCKS if aot else None)

    @property
    def stack_elements(self) -> int:
        return self.settings.stack_elements

    @property
    def is_compiled(self) -> bool:
        return self.compiler.enabled

    def vocab_tile(self, device: torch.device) -> int | None:
        return self.settings.cpu_vocab_tile if device.type == "cpu" else None

    def row_ranges(self, n: int, vocab: int):
        """[r0, r1) ranges of about ``chunk_elements`` (``chunk_elements_eager`` eager)."""
        s = self.settings
        budget = s.chunk_elements if self.is_compiled else s.chunk_elements_eager
        rows = max(1, budget // vocab)
        return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]

    def _blocks(self, fn, n: int, vocab: int, out_shape, dtype, device):
        """Run ``fn(r0, r1)`` over the row ranges: a single block returns its own result,
        several write into one (..., n) float32 tensor."""
        ranges = self.row_ranges(n, vocab)
        if len(ranges) == 1:
            return fn(0, n)
        out = torch.empty(out_shape, dtype=dtype, device=device)
        for r0, r1 in ranges:
            out[..., r0:r1] = fn(r0, r1)
        return out

    def row_stats(self, z, u, labels, *, divergence: str, tau: float, alpha: float,
                  ignore_index: int) -> RowStats:
        """Per-row (lse_S, lse_T, D, aux, s_y, t_y, lse_S - lse_T), (B, T) each: float32 but
        the log-sum-exps, float64 (``passes.anchor``)."""
        B, T, V = z.shape
        zr, ur, yr = Rows(z), Rows(u), Rows(labels)
        tau_t = self.compiler.scalar(tau, z)
        alpha_t = self.compiler.scalar(alpha, z, torch.float64)
        stats = STATS[divergence]

        def block(r0, r1):
            y = yr.block(r0, r1)
            return self.compiler.run(stats, zr.block(r0, r1), ur.block(r0, r1), y,
                                     y != ignore_index, tau_t, alpha_t)

        return passes.row_stats(self._blocks(block, B * T, V, (7, B * T), torch.float64,
                                             z.device), B, T)

    def row_stats_and_grad(self, z, u, labels, *, divergence: str, tau: float, alpha: float,
                           ignore_index: int):
        """For inputs of at most ``small_elements`` logits: ``row_stats`` and, from the same
        call, the float32 (B, T, V) gradient of each row's divergence over tau, d D / d z (0
        on ignored rows), and whether that gradient is known to be finite. None for larger
        inputs (use ``row_stats`` and ``write_grad``). On CPU, fkl and rkl take the
        mean-shifted pass, whose gradient is finite, and the general one only when a kept row
        holds a non-finite value (its flag is read on the host: free on CPU, a sync on a
        GPU)."""
        B, T, V = z.shape
        n = B * T
        if n * V > self.settings.small_elements:
            return None
        y = labels.reshape(n)
        args = (z.reshape(n, V), u.reshape(n, V), y, y != ignore_index,
                self.compiler.scalar(tau, z), self.compiler.scalar(alpha, z, torch.float64))
        shifted = STATS_GRADS_SHIFTED.get(divergence) if z.device.type == "cpu" else None
        finite = False
        if shifted is not None:
            stats, grad, ok = self.compiler.run(shifted, *args[:5])
            finite = bool(ok.all())
        if not finite:
            stats, grad = self.compiler.run(STATS_GRADS[divergence], *args)
        return passes.row_stats(stats, B, T), grad.view(B, T, V), finite

    def label_logprob(self, x, labels, *, tau: float, ignore_index: int):
        """log softmax(x / tau)[labels] per row as float32 (B, T); 0 on ignored rows."""
        B, T, V = x.shape
        xr, yr = Rows(x), Rows(labels)
        tau_t = self.compiler.scalar(tau, x)

        def block(r0, r1):
            y = yr.block(r0, r1)
            return self.compiler.run(passes.label_block, xr.block(r0, r1), y,
                                     y != ignore_index, tau_t)

        return self._blocks(block, B * T, V, (B * T,), torch.float32, x.device).view(B, T)

    def write_grad(self, z, u, labels, out, stats: RowStats, ck, cc, *, divergence: str,
                   tau: float, alpha: float) -> None:
        """Write d loss / d z into ``out`` (may be ``z`` itself) from the row stats (their
        log-sum-exps as float64 anchors) and the coefficients. Rows with ck = cc = 0
        (ignored, or clipped without hinge) are written as zeros, so non-finite values there
        never reach the gradient."""
        B, T, V = z.shape
        zr, ur, yr, outr = Rows(z), Rows(u), Rows(labels), Rows(out)
        tau_t = self.compiler.scalar(tau, z)
        alpha_t = self.compiler.scalar(alpha, z, torch.float64)
        anchors = (*passes.anchor(stats.lse_s.reshape(-1).double(), tau_t),
                   *passes.anchor(stats.lse_t.reshape(-1).double(), tau_t))
        rows = [*anchors, *(t.reshape(-1) for t in (stats.lse_gap, stats.divergence, stats.aux,
                                                   ck, cc))]
        for r0, r1 in self.row_ranges(B * T, V):
            block = outr.flat[r0:r1] if outr.flat is not None else torch.empty(
                (r1 - r0, V), dtype=out.dtype, device=out.device)
            zb, ub = zr.block(r0, r1), ur.block(r0, r1)
            rest = (yr.block(r0, r1), *(t[r0:r1] for t in rows), tau_t, alpha_t)
            if same_view(block, zb):
                self.compiler.run(GRADS_INTO_Z[divergence], zb, ub, *rest)
            elif same_view(block, ub):
                self.compiler.run(GRADS_INTO_U[divergence], zb, ub, *rest)
            else:
                self.compiler.run(GRADS[divergence], block, zb, ub, *rest)
            if outr.flat is None:
                outr.write(r0, r1, block)

    def support_stats(self, z, u, labels, index, *, k: int, tau: float, ignore_index: int):
        """The support pass of a sparse support (docs/losses.md, "Sparse supports"): the
        student's top-k with the teacher ``u`` (index None), or the given ``index``."""
        return sparse.support_stats(self.compiler, z, u, labels, index, k=k, tau=tau,
                                    ignore_index=ignore_index)

    def support_grad(self, z, out, rows, beta, coef, labels, cc, *, tau: float) -> None:
        """The dense gradient of a sparse support into ``out`` (which may be ``z``)."""
        sparse.support_grad(self.compiler, z, out, rows, beta, coef, labels, cc, tau=tau)


@functools.cache
def default_backend() -> TorchBackend:
    """The process's shared ``TorchBackend`` (created on first use)."""
    return TorchBackend()
