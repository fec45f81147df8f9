"""A run's checkpoints: what they hold, written at a step and restored on resume.

A checkpoint holds the student's trainable weights, the optimizer, the scheduler, the EMA
teacher, every rank's RNG state and the metric records. Under FSDP2 the tensors go through
``torch.distributed.checkpoint`` (:mod:`.dcp`), else rank 0 writes one ``state.pt``
(:mod:`.checkpoint`). Non-finite weights are never saved (:func:`.guard.check_finite`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import dcp, distributed
from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .distributed import Parallel
from .guard import check_finite
from .resume import continue_schedule, read_state
from .roles import Roles

log = logging.getLogger("unisd_fast.train")


def trainable_state(student, lora: bool) -> dict:
    if not lora:
        return student.state_dict()
    return {n: p.detach() for n, p in student.named_parameters() if p.requires_grad}


def load_trainable_state(student, state: dict, lora: bool) -> None:
    if not lora:
        student.load_state_dict(state)
        return
    result = student.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"checkpoint holds unknown student weights: {result.unexpected_keys[:3]}")


def save(
    step: int,
    cfg: TrainConfig,
    roles: Roles,
    optimizer,
    scheduler,
    records: list[dict],
    par: Parallel,
) -> Path:
    """Write the checkpoint of ``step`` (every rank calls this); returns its folder."""
    local = distributed.local_tensor
    student_state = trainable_state(roles.student, roles.lora)
    check_finite({k: local(v) for k, v in student_state.items()}, f"the student at step {step}")
    ema = roles.ema
    if ema is not None:
        teacher_state = ema.state_dict()["model"]
        check_finite(
            {k: local(v) for k, v in teacher_state.items()}, f"the EMA teacher at step {step}"
        )
    rngs = distributed.gather_objects(rng_state(), par)
    meta = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "rng": rngs[0],
        "rng_ranks": rngs,
        "world_size": par.world_size,
        "records": records,
    }
    out, config = Path(cfg.output_dir), cfg.to_dict()
    if par.mode == "fsdp":
        meta["ema_updates"] = ema.num_updates if ema is not None else 0
        return dcp.save(
            out, step, roles.runner, optimizer, ema, meta, config, cfg.keep_checkpoints, par
        )
    final = None
    if par.is_main:
        meta.update(
            student=trainable_state(roles.student, roles.lora),
            optimizer=optimizer.state_dict(),
            ema=ema.state_dict() if ema is not None else None,
        )
        final = save_checkpoint(out, step, meta, config, cfg.keep_checkpoints)
    distributed.barrier(par)
    return distributed.broadcast_object(final, par)


def restore(checkpoint: Path, roles: Roles, optimizer, scheduler, par: Parallel):
    """Load ``checkpoint`` into the models, optimizer, scheduler and RNGs of this rank;
    returns (its step, its metric records)."""
    ema = roles.ema
    if par.mode == "fsdp":
        state = dcp.load(checkpoint, roles.runner, optimizer, ema, par)
        if ema is not None:
            ema.num_updates = state["ema_updates"]
    else:
        state = read_state(checkpoint)
        load_trainable_state(roles.student, state["student"], roles.lora)
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    scheduler.load_state_dict(state["scheduler"])
    continue_schedule(scheduler)
    if state.get("world_size", 1) != par.world_size:
        raise ValueError(
            f"resume: {checkpoint} was written by {state.get('world_size', 1)} processes; "
            f"resume it with as many (this run has {par.world_size})"
        )
    set_rng_state(state.get("rng_ranks", [state["rng"]])[par.rank])
    log.info("resumed from %s at step %d", checkpoint, state["step"])
    return state["step"], state["records"]
