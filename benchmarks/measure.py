"""Timing, peak memory and error measurement of one provider on one set of inputs.

Each repetition runs on fresh gradients (``.grad = None``): forward, then (when a backward
mode is asked for) backward, timed separately, so one repetition yields the forward, the
backward and the forward+backward figures. Times are medians over repetitions: CUDA events
on GPU, ``time.perf_counter`` on CPU (where every op is synchronous). Memory and time are
measured in separate repetitions (``measure_memory``, ``measure_time``).

Peak memory is measured above what is allocated just before the forward, that is above the
inputs: the CUDA caching allocator's ``max_memory_allocated`` on GPU; on CPU the process's
peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) above its resident set
before the forward. That only follows the tensors if freed blocks leave the resident set
and new ones enter it: glibc reuses free heap chunks before it maps new memory, so a heap
that ever held a large block makes later peaks wrong by whole tensors. The CPU worker
therefore measures memory for all its cases first, with the mmap threshold pinned at
64 KiB from the process start (no large block ever lives in the heap), and only then times
them with glibc's usual 32 MiB threshold. The backward's peak counts what the forward saved
and the gradient it writes.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import threading
import time

import torch

from .inputs import clear_grads, grad_leaves

MB = 2**20



def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


SMALL_MMAP = 64 * 1024
GLIBC_MMAP = 32 * MB  # where glibc's dynamic threshold settles once large blocks are freed


def pin_malloc(threshold: int) -> None:
    """Fix glibc's mmap threshold (no dynamic growth): blocks >= threshold are mmapped and
    unmapped on free."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 * threshold)  # M_TRIM_THRESHOLD


def trim_heap() -> None:
    """Give the heap's free pages back to the OS."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class CudaMemory:
    """Bytes allocated by PyTorch's CUDA caching allocator, and their peak since reset."""

    def __init__(self, device):
        self.device = device

    def reset(self) -> int:
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


class RssMemory:
    """Resident set of this process and its peak since reset (Linux /proc)."""

    def __init__(self):
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self._sampler = _RssSampler()

    def reset(self) -> int:
        if self._sampler is not None:
            return self._sampler.reset()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        return _status_kb("VmRSS:") * 1024

    def peak(self) -> int:
        if self._sampler is not None:
            return self._sampler.peak()
        return _status_kb("VmHWM:") * 1024


class _RssSampler:
    """Fallback where clear_refs is not writable: a thread sampling VmRSS every 0.5 ms."""

    def __init__(self):
        self._max = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            rss = _status_kb("VmRSS:") * 1024
            with self._lock:
                self._max = max(self._max, rss)
            time.sleep(0.0005)

    def reset(self) -> int:
        rss = _status_kb("VmRSS:") * 1024
        with self._lock:
            self._max = rss
        return rss

    def peak(self) -> int:
        with self._lock:
            return max(self._max, _status_kb("VmRSS:") * 1024)


class CpuClock:
    def mark(self):
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return (b - a) * 1e3

    def sync(self):
        pass


class CudaClock:
    def mark(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(self, a, b) -> float:
        return a.elapsed_time(b)

    def sync(self):
        torch.cuda.synchronize()


def tools_for(device: torch.device):
    """(clock, memory) for a device."""
    if device.type == "cuda":
        return CudaClock(), CudaMemory(device)
    return CpuClock(), RssMemory()


def _rep(fn, inputs, backward, clock, memory) -> dict:
    """One repetition on fresh gradients: times (ms) and peaks above inputs (bytes)."""
    clear_grads(inputs)
    clock.sync()
    base = memory.reset()
    t0 = clock.mark()
    loss = fn(inputs)
    t1 = clock.mark()
    clock.sync()
    out = {"loss": loss, "fwd_ms": clock.ms(t0, t1), "fwd_peak": memory.peak() - base}
    if backward:
        memory.reset()
        t2 = clock.mark()
        loss.backward()
        t3 = clock.mark()
        clock.sync()
        out["bwd_ms"] = clock.ms(t2, t3)
        out["bwd_peak"] = memory.peak() - base
    return out


def _backward(modes) -> bool:
    return any(m != "fwd" for m in modes)


def _peaks(r: dict, backward: bool) -> dict:
    """{mode: peak bytes above the inputs} of one repetition."""
    peaks = {"fwd": max(r["fwd_peak"], 0)}
    if backward:
        peaks["bwd"] = max(r["bwd_peak"], 0)
        peaks["fwd_bwd"] = max(peaks["fwd"], peaks["bwd"])
    return peaks


def measure_first(fn, inputs: dict, modes, device: torch.device) -> dict:
    """The first call of ``fn`` in this process: {"mem": {mode: peak bytes above the inputs},
    "time": {mode: ms}} of one repetition with nothing run before it, so that whatever the
    first call costs (compiling, loading compiled code) is in it. Run it first in a fresh
    process."""
    clock, memory = tools_for(device)
    backward = _backward(modes)
    trim_heap()
    r = _rep(fn, inputs, backward, clock, memory)
    clear_grads(inputs)
    times = {"fwd": r["fwd_ms"]}
    if backward:
        times.update(bwd=r["bwd_ms"], fwd_bwd=r["fwd_ms"] + r["bwd_ms"])
    peaks = _peaks(r, backward)
    return {"mem": {m: peaks[m] for m in modes}, "time": {m: times[m] for m in modes}}


def measure_memory(fn, inputs: dict, modes, warmup: int, device: torch.device) -> dict:
    """{mode: peak bytes above the inputs} of ``fn(inputs) -> loss`` in one repetition after
    ``warmup`` untimed ones. On CPU run this with ``pin_malloc(SMALL_MMAP)`` in force from
    the process start (see the module docstring)."""
    clock, memory = tools_for(device)
    backward = _backward(modes)
    for _ in range(warmup):
        _rep(fn, inputs, backward, clock, memory)
    clear_grads(inputs)
    trim_heap()
    r = _rep(fn, inputs, backward, clock, memory)
    clear_grads(inputs)
    peaks = _peaks(r, backward)
    return {m: peaks[m] for m in modes}


def measure_time(fn, inputs: dict, modes, reps: int, warmup: int, device: torch.device):
    """({mode: median ms}, loss, grads) of ``fn(inputs) -> loss`` over ``reps`` repetitions
    after ``warmup`` untimed ones; loss and grads are those of the last repetition."""
    clock, memory = tools_for(device)
    backward = _backward(modes)
    for _ in range(warmup):
        _rep(fn, inputs, backward, clock, memory)
    times = {"fwd": [], "bwd": [], "fwd_bwd": []}
    r = None
    for _ in range(max(reps, 1)):
        r = _rep(fn, inputs, backward, clock, memory)
        times["fwd"].append(r["fwd_ms"])
        if backward:
            times["bwd"].append(r["bwd_ms"])
            times["fwd_bwd"].append(r["fwd_ms"] + r["bwd_ms"])
    out = {m: statistics.median(times[m]) for m in modes}
    grads = [t.grad for t in grad_leaves(inputs)] if backward else []
    return out, r["loss"].detach(), grads


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, computed on a's device in row blocks of <= 2**25 elements
    (b, the float64 reference, may sit on the host)."""
    a2 = a.detach().reshape(-1, a.shape[-1])
    b2 = b.reshape(-1, b.shape[-1])
    rows = max(1, 2**25 // a2.shape[1])
    worst = 0.0
    for r in range(0, a2.shape[0], rows):
        ref = b2[r:r + rows].to(a2.device, torch.float64)
        worst = max(worst, float((a2[r:r + rows].double() - ref).abs().max()))
    return worst


def errors(loss: torch.Tensor, grad: torch.Tensor | None, ref: dict) -> dict:
    """Loss and logits-gradient errors against a float64 reference {"loss", "grad"}.

    loss_rel_err = |L - L_ref| / |L_ref|; grad_rel_err = max|g - g_ref| / max|g_ref|.
    """
    ref_loss = float(ref["loss"])
    loss_abs = abs(float(loss) - ref_loss)
    out = {"loss_abs_err": loss_abs, "loss_rel_err": loss_abs / max(abs(ref_loss), 1e-30)}
    if grad is not None and ref.get("grad") is not None:
        g_abs = max_abs_diff(grad, ref["grad"])
        scale = float(ref["grad"].abs().max())
        out["grad_abs_err"] = g_abs
        out["grad_rel_err"] = g_abs / scale if scale > 0 else math.nan
    return out
