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


def gather_layout(rows: int, chunk_bytes: int, labels: torch.Tensor, ignore_index: int, group,
                  vocab_size: int | None = None) -> ShardLayout:
    """The layout from each rank's head rows and chunk size, with its count of label rows
    and of kept ones (one all-gather of four ints). ValueError where a shard is empty, the
    shards do not add up to ``vocab_size`` (when given), or the ranks' label counts differ
    (they must pass the same rows, or their collectives would not pair up)."""
    world = dist.get_world_size(group)
    mine = torch.stack([torch.tensor(rows), torch.tensor(chunk_bytes),
                        torch.tensor(labels.numel()),
                        (labels != ignore_index).sum().cpu()]).to(labels.device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    counts = {tuple(int(x) for x in p[2:].tolist()) for p in parts}
    if len(counts) > 1:
        raise ValueError(f"vocab_parallel: every rank must pass the same hidden states and "
                         f"labels; the ranks' (rows, rows not ignored) are {sorted(counts)}")
    sizes = tuple(int(p[0].item()) for p in parts)
    if min(sizes) == 0:
        raise ValueError(f"vocab_parallel: every rank must hold at least one head row, got "
                         f"shard sizes {sizes}")
    if vocab_size is not None and sum(sizes) != vocab_size:
        raise ValueError(f"vocab_parallel: the head shards {sizes} add up to {sum(sizes)} "
                         f"rows, not vocab_size={vocab_size}")
    return ShardLayout(sizes, dist.get_rank(group), min(int(p[1].item()) for p in parts))
