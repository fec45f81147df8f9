"""Sharded checkpoints under FSDP2, through torch.distributed.checkpoint (docs/trainer.md).

``checkpoint-NNNNNN/shards/`` holds the student's trainable weights, the optimizer, and the
EMA teacher with its float32 master, each rank writing its own shards; ``state.pt`` (written
by rank 0) holds the step, scheduler, every rank's RNG state and the metric records, and
``config.json`` the resolved config. The folder is assembled under a temporary name and
renamed into place by rank 0 once every rank has written, as the unsharded checkpoints are.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .checkpoint import PREFIX, list_checkpoints
from .distributed import Parallel, barrier, broadcast_object

OPTIONS = StateDictOptions(ignore_frozen_params=True)


def _master_dtensors(ema) -> dict:
    """The EMA teacher's float32 master shards as DTensors laid out like its parameters."""
    from torch.distributed.tensor import DTensor

    params = dict(ema._lm().named_parameters())
    out = {}
    for name in ema.names:
        p = params[name]
        out[name] = DTensor.from_local(
            ema.master[name], p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
        )
    return out


def _sharded_state(runner, optimizer, ema) -> dict:
    student, optim = get_state_dict(runner, optimizer, options=OPTIONS)
    state = {"student": student, "optimizer": optim}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema.model)
        if ema.master is not None:
            state["ema_master"] = _master_dtensors(ema)
    return state


def save(output_dir, step: int, runner, optimizer, ema, meta: dict, config: dict, keep: int,
         par: Parallel) -> Path:
    """Every rank calls this; returns the checkpoint folder."""
    root = Path(output_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}"
    if par.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(par)
    dcp.save(_sharded_state(runner, optimizer, ema), checkpoint_id=str(tmp / "shards"))
    barrier(par)
    if par.is_main:
        torch.save(meta, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    barrier(par)
    return final


def is_sharded(path) -> bool:
    return (Path(path) / "shards").is_dir()


def load(path, runner, optimizer, ema, par: Parallel) -> dict:
    """Restore the sharded state in place; returns rank 0's ``state.pt`` (on every rank)."""
    path = Path(path)
    if not is_sharded(path):
        raise ValueError(f"resume: {str(path)!r} is not a sharded (FSDP) checkpoint")
    state = _sharded_state(runner, optimizer, ema)
    dcp.load(state, checkpoint_id=str(path / "shards"))
    set_state_dict(
        runner,
        optimizer,
        model_state_dict=state["student"],
        optim_state_dict=state["optimizer"],
        options=OPTIONS,
    )
    if ema is not None:
        set_model_state_dict(ema.model, state["ema"])
        if ema.master is not None:
            for name, value in state["ema_master"].items():
                ema.master[name].copy_(value.to_local())
    meta = None
    if par.is_main:
        meta = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return broadcast_object(meta, par)
