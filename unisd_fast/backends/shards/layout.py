"""Which vocabulary rows each rank of a group holds: contiguous shards in rank order, of any
sizes (a vocabulary not divisible by the world size gives uneven shards)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ShardLayout:
    """``sizes[r]``: head rows of rank r; this rank is ``rank``, holding the full-vocab ids
    [start, stop). ``chunk_bytes``: the smallest of the ranks' chunk sizes, which all use."""

    sizes: tuple[int, ...]
    rank: int
    chunk_bytes: int

    @property
    def full(self) -> int:
        return sum(self.sizes)

    @property
    def start(self) -> int:
        return sum(self.sizes[:self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.sizes[self.rank]

    @property
    def widest(self) -> int:
        """The largest shard: every rank sizes its chunks by it, so that all ranks cut the
        same chunks and their collectives pair up."""
        return max(self.sizes)


def gather_layout(rows: int, chunk_bytes: int, group, device: torch.device,
                  vocab_size: int | None = None) -> ShardLayout:
    """The layout from each rank's head rows and chunk size (one all-gather of two ints).
    ValueError where a shard is empty or the shards do not add up to ``vocab_size`` (when
    given)."""
    world = dist.get_world_size(group)
    mine = torch.tensor([rows, chunk_bytes], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    sizes = tuple(int(p[0].item()) for p in parts)
    if min(sizes) == 0:
        raise ValueError(f"vocab_parallel: every rank must hold at least one head row, got "
                         f"shard sizes {sizes}")
    if vocab_size is not None and sum(sizes) != vocab_size:
        raise ValueError(f"vocab_parallel: the head shards {sizes} add up to {sum(sizes)} "
                         f"rows, not vocab_size={vocab_size}")
    return ShardLayout(sizes, dist.get_rank(group), min(int(p[1].item()) for p in parts))
