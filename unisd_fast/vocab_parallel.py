"""``VocabParallel``: lm_heads split by vocabulary rows over the ranks of a process group
(the tensor-parallel output layer of Megatron, or a ``DTensor`` weight sharded on dimension
0), for ``unisd_linear_loss(..., vocab_parallel=...)``, and logits split so, for
``unisd_loss(..., vocab_parallel=...)`` (docs/kernels.md, "Vocabulary-parallel heads").

Each rank passes its own shard of every head (rank r the rows after those of ranks < r, any
sizes, at least one row each) and the same hidden states and full-vocab labels; each gets the
loss of the whole head, d hidden summed over the group, and d weight of its own shard.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .backends.shards.combine import VocabShards
from .backends.shards.layout import gather_layout


@dataclass(frozen=True)
class VocabParallel:
    """group: the ``torch.distributed`` process group the heads are split over (None: the
    default group); vocab_size: the whole vocabulary, checked against the shards' sum
    (None: their sum)."""

    group: Any = None
    vocab_size: int | None = None


@dataclass(frozen=True)
class LocalHeads:
    """The heads as this rank's shards (plain tensors) and the group's name (None: whole
    heads, not split)."""

    group_name: str | None
    vocab_size: int | None
    student_weight: torch.Tensor
    teacher_weight: torch.Tensor
    student_bias: torch.Tensor | None
    teacher_bias: torch.Tensor | None


def _split(vocab_parallel) -> VocabParallel | None:
    if vocab_parallel is None or isinstance(vocab_parallel, VocabParallel):
        return vocab_parallel
    if isinstance(vocab_parallel, dist.ProcessGroup):
        return VocabParallel(vocab_parallel)
    raise TypeError(f"vocab_parallel must be a torch.distributed ProcessGroup, a "
                    f"VocabParallel or None, got {type(vocab_parallel).__name__}")


def _check_size(vocab_size) -> None:
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(
            vocab_size, int) or vocab_size <= 0):
        raise ValueError(f"VocabParallel.vocab_size must be a positive int or None, got "
                         f"{vocab_size!r}")


def _initialised() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel (or a DTensor head) needs torch.distributed "
                         "initialised")


def logit_shards(vocab_parallel, student_logits: torch.Tensor, labels: torch.Tensor,
                 ignore_index: int) -> VocabShards | None:
    """The shards of (B, T, V_r) logits split over ``vocab_parallel`` (None: whole logits),
    their layout gathered over the group."""
    split = _split(vocab_parallel)
    if split is None:
        return None
    _check_size(split.vocab_size)
    _initialised()
    group = split.group or dist.group.WORLD
    return VocabShards(group, gather_layout(student_logits.shape[-1], 1, labels, ignore_index,
                                            group, split.vocab_size))


def _local(name: str, x, meshes: list):
    """A DTensor sharded on dim 0 of a 1-D mesh as its local shard (its mesh noted), any
    other tensor as is. (A DTensor exists only once its module is loaded: unless it is, no
    import here.)"""
    if "torch.distributed.tensor" not in sys.modules:
        return x
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(x, DTensor):
        return x
    if x.device_mesh.ndim != 1 or tuple(x.placements) != (Shard(0),):
        raise ValueError(f"{name}: a DTensor head must be sharded on dimension 0 of a 1-D "
                         f"mesh (placements (Shard(0),)), got placements {x.placements} on "
                         f"a {x.device_mesh.ndim}-D mesh")
    meshes.append((name, x.device_mesh, x.shape[0]))
    return x.to_local()


def local_heads(vocab_parallel, student_weight, teacher_weight, student_bias,
                teacher_bias) -> LocalHeads:
    """The heads of one call as local shards: those of ``vocab_parallel``, of DTensor heads
    sharded on dim 0, or whole heads. Tensors shared between the heads stay shared."""
    split = _split(vocab_parallel)
    meshes: list = []
    tensors = {}
    named = (("student_weight", student_weight), ("teacher_weight", teacher_weight),
             ("student_bias", student_bias), ("teacher_bias", teacher_bias))
    for name, x in named:
        if x is not None and id(x) not in tensors:
            tensors[id(x)] = _local(name, x, meshes)
    local = [None if x is None else tensors[id(x)] for _, x in named]
    if split is None and not meshes:
        return LocalHeads(None, None, *local)
    _initialised()
    group = None if split is None else split.group
    vocab_size = None if split is None else split.vocab_size
    _check_size(vocab_size)
    if meshes:
        if len(meshes) != len(tensors):
            raise ValueError("vocab_parallel: give every head tensor as a DTensor sharded on "
                             f"dimension 0, or none; got DTensors for only "
                             f"{[m[0] for m in meshes]}")
        mesh_groups = {m[1].get_group(0) for m in meshes}
        if len(mesh_groups) != 1 or (group is not None and group not in mesh_groups):
            raise ValueError("vocab_parallel: the DTensor heads must share one mesh, the "
                             "group of vocab_parallel when one is given")
        group = mesh_groups.pop()
        sizes = {m[2] for m in meshes}
        if len(sizes) != 1 or (vocab_size is not None and vocab_size not in sizes):
            raise ValueError(f"vocab_parallel: the DTensor heads' vocabulary sizes {sizes} "
                             f"differ from each other or from vocab_size={vocab_size}")
        vocab_size = sizes.pop()
    if group is None:
        group = dist.group.WORLD
    return LocalHeads(group.group_name, vocab_size, *local)
