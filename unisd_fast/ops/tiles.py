"""The vocabulary tiles of the fused-linear CPU schedule, shared out over worker threads.

A sweep over the head in tiles of 1024 rows is thousands of small GEMMs and elementwise ops
per call. Run one after the other with torch's intra-op threads, each op is a parallel
region ending in a barrier, and on a CPU where another process holds a core every barrier
waits for the descheduled thread: with 2 threads under a competing load the sweep took 2.4x
the time of the materialised path, whose few large ops hold (3x slower than the same tiles
shared out, measured on 2 cores at load 5). Here each of P worker threads (P = torch's
intra-op thread count) runs torch single-threaded on its own tiles, so a busy core slows one
share and blocks nothing else. The share is static (tile i to worker i mod P) and the
workers' partial sums are added in worker order, so results are the same run to run; with
P = 1, or a single tile, the sweep runs inline exactly as a plain loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch


def tile_ranges(V: int, tile: int) -> list[tuple[int, int]]:
    return [(v0, min(V, v0 + tile)) for v0 in range(0, V, tile)]


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="unisd-tiles",
                              initializer=torch.set_num_threads, initargs=(1,))


def shares(tiles: list, workers: int | None = None) -> list[list]:
    """The tiles of each worker: tile i to worker i mod P (no more workers than tiles)."""
    P = max(1, min(workers or torch.get_num_threads(), len(tiles)))
    return [tiles[w::P] for w in range(P)]


def run_shares(fn: Callable, tiles: list) -> list:
    """``[fn(share_w) for each worker w]``: inline for one share, else one share per worker
    thread, under the caller's grad mode (thread-local in torch). Results in worker order."""
    parts = shares(tiles)
    if len(parts) == 1:
        return [fn(parts[0])]
    grad = torch.is_grad_enabled()

    def worker(share):
        with torch.set_grad_enabled(grad):
            return fn(share)

    return list(_pool(len(parts)).map(worker, parts))
