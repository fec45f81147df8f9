"""Data-parallel and sharded training under torchrun (docs/trainer.md, "Scale-out").

PyTorch's own engine does the work: the process group comes from torchrun's environment
(nccl on CUDA, gloo on CPU), ``--parallel ddp`` wraps the model in DistributedDataParallel,
``--parallel fsdp`` applies FSDP2 ``fully_shard`` to every decoder layer and then to the root.
``--tensor-parallel N`` puts ranks r with the same r // N in one tensor-parallel group, which
takes the same data and splits the lm_head by vocabulary rows in the loss
(:mod:`.tensor_parallel`); DDP then runs over the groups (ranks with the same r % N).
Every use of a wrapped model (forward, generation, the head inside the loss) runs inside the
root module's forward, through :class:`unisd_fast.train.teachers.Runner`, so that DDP's and
FSDP's hooks see it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PARALLEL = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class Parallel:
    """This process's place: ``mode`` is "none", "ddp" or "fsdp". ``tensor_parallel`` ranks
    form a group (``tp_group``) that shares its data; ``data_rank`` of ``data_world`` such
    groups, joined by ``dp_group`` (None: the whole world)."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    tensor_parallel: int = 1
    tp_group: object = None
    dp_group: object = None

    @property
    def data_rank(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def data_world(self) -> int:
        return self.world_size // self.tensor_parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.mode != "none"


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_mode(parallel: str) -> str:
    """``auto``: ddp when torchrun started more than one process, else none."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if parallel == "auto":
        return "ddp" if env_world_size() > 1 else "none"
    return parallel


def setup(parallel: str, device: torch.device, tensor_parallel: int = 1) -> Parallel:
    """Join (or create) the process group named by torchrun's environment variables, and
    the tensor-parallel and data-parallel groups of ``tensor_parallel`` > 1.

    ``--parallel ddp|fsdp`` in a single process without torchrun is a group of one (useful to
    test the wrapped path); ``none`` with WORLD_SIZE > 1 is an error, since every rank would
    train its own copy.
    """
    mode = resolve_mode(parallel)
    world = env_world_size()
    if mode == "none":
        if world > 1:
            raise ValueError(
                f"--parallel none under torchrun with WORLD_SIZE={world}: use ddp or fsdp"
            )
        return Parallel()
    owns = not dist.is_initialized()
    if owns:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rank, world = dist.get_rank(), dist.get_world_size()
    if tensor_parallel == 1:
        return Parallel(mode, rank, world, local_rank, owns)
    if world % tensor_parallel:
        raise ValueError(f"--tensor-parallel {tensor_parallel} must divide WORLD_SIZE={world}")
    # every rank creates every group, in the same order
    tp = [dist.new_group(list(range(g, g + tensor_parallel)))
          for g in range(0, world, tensor_parallel)]
    dp = [dist.new_group(list(range(i, world, tensor_parallel)))
          for i in range(tensor_parallel)]
    return Parallel(mode, rank, world, local_rank, owns, tensor_parallel,
                    tp[rank // tensor_parallel], dp[rank % tensor_parallel])


def local_device(device: torch.device, par: Parallel) -> torch.device:
    """Under torchrun on CUDA, rank r of a node uses GPU LOCAL_RANK."""
    if device.type == "cuda" and par.distributed and device.index is None:
        device = torch.device("cuda", par.local_rank)
        torch.cuda.set_device(device)
    return device


def teardown(par: Parallel) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if par.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(par: Parallel) -> None:
    if par.distributed:
        dist.barrier()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a (peft-wrapped) transformers causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(lm.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__} has no decoder .layers to shard")
    return list(layers)


def wrap(runner: nn.Module, par: Parallel, device: torch.device, trainable: bool) -> nn.Module:
    """The runner as this rank uses it: itself (none, or a frozen model under DDP, where a
    replica per rank needs no wrapper), DistributedDataParallel, or sharded by FSDP2."""
    if par.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(runner.model):
            fully_shard(layer)
        fully_shard(runner)
        return runner
    if par.mode == "ddp" and trainable:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            runner, device_ids=ids, broadcast_buffers=False, process_group=par.dp_group
        )
    return runner


def unwrap(runner: nn.Module) -> nn.Module:
    """The Runner inside a DistributedDataParallel wrapper (FSDP2 wraps in place)."""
    return runner.module if isinstance(runner, nn.parallel.DistributedDataParallel) else runner


@contextlib.contextmanager
def gradient_sync(runner: nn.Module, par: Parallel, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
    if par.mode == "ddp" and not enabled and hasattr(runner, "no_sync"):
        with runner.no_sync():
            yield
        return
    if par.mode == "fsdp":
        runner.set_requires_gradient_sync(enabled)
    yield


def all_reduce_sum(values: list[float], par: Parallel, device: torch.device) -> list[float]:
    """Element-wise sums over ranks of a list of numbers (one collective, float64); over
    the data-parallel groups only, whose tensor-parallel ranks hold the same numbers."""
    if not par.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=par.dp_group)
    return t.tolist()


def all_reduce_max(value: float, par: Parallel, device: torch.device) -> float:
    if not par.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather_objects(obj, par: Parallel) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not par.distributed:
        return [obj]
    out = [None] * par.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, par: Parallel):
    """Rank 0's ``obj`` on every rank."""
    if not par.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of it), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank, or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_grad_norm(params: list, max_norm: float) -> float:
    """Clip the global gradient norm; the norm before clipping (sharded grads included)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return full_tensor(norm).item()


def model_state(runner: nn.Module, par: Parallel, trainable_only: bool) -> dict:
    """The full (unsharded) state dict of the runner's model, on CPU, on every rank; under
    LoRA only the trainable weights."""
    model = unwrap(runner).model
    if par.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(unwrap(runner), options=options)
        state = {k.removeprefix("model."): v for k, v in state.items()}
    else:
        state = model.state_dict()
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in keep}
    return state
