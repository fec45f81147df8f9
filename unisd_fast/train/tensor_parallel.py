"""The lm_head split by vocabulary rows over a tensor-parallel group, for the loss only.

Each rank of the group holds the whole (replicated) model and takes the same data; in the
loss it passes the rows of its vocabulary shard of the student and teacher heads to
``unisd_linear_loss(..., vocab_parallel=group)``, which combines the per-row statistics over
the group and returns d hidden summed over it, so no rank forms logits over the whole
vocabulary. The head's gradient is that of its own rows; ``VocabRows`` gathers the shards'
gradients in backward, so the replicated weight (and an embedding tied to it) gets the whole
head's gradient on every rank and the replicas stay equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import LinearHead


def shard_range(V: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of rank ``rank``: V / world each, the first V % world one more."""
    size, extra = divmod(V, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


class VocabRows(torch.autograd.Function):
    """Forward: this rank's rows of a (V, ...) tensor. Backward: the gradients of every
    rank's rows, gathered over the group into the (V, ...) gradient."""

    @staticmethod
    def forward(ctx, x, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.group, ctx.V = group, x.shape[0]
        start, stop = shard_range(x.shape[0], rank, world)
        return x[start:stop]

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        ranges = [shard_range(ctx.V, r, world) for r in range(world)]
        parts = [grad.new_empty((b - a, *grad.shape[1:])) for a, b in ranges]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts), None


def vocab_shards(student: LinearHead, teacher: LinearHead, group):
    """The student and teacher heads as this rank's row shards (tensors shared between them
    stay shared, so that a shared head runs one GEMM)."""
    done: dict = {}

    def rows(x):
        if x is None:
            return None
        if id(x) not in done:
            done[id(x)] = VocabRows.apply(x, group) if x.requires_grad else x[
                slice(*shard_range(x.shape[0], dist.get_rank(group),
                                   dist.get_world_size(group)))]
        return done[id(x)]

    def head(h):
        return LinearHead(rows(h.weight), rows(h.bias), h.softcap, h.scale)

    return head(student), head(teacher)
