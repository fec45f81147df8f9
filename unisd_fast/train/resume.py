"""Resuming a run (docs/trainer.md, "Resume"): reading a checkpoint with errors that name the
file, refusing to continue a different run, and the learning rate of the continued schedule.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Settings a resumed run must share with its checkpoint: the model and what it is trained for.
FIXED = (
    "model",
    "tiny_arch",
    "tiny_hidden_size",
    "tiny_layers",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "method",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run; names the file."""


def read_config(checkpoint) -> dict:
    """The TrainConfig values a checkpoint was saved with (its ``config.json``)."""
    path = Path(checkpoint) / "config.json"
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint config {str(path)!r} cannot be read: {e}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint config {str(path)!r} does not hold a mapping")
    return values


def check_state_file(checkpoint) -> Path:
    """``state.pt`` of a checkpoint, after the cheap checks (present, not empty)."""
    path = Path(checkpoint) / "state.pt"
    if not path.is_file() or path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint state {str(path)!r} is missing or empty; resume from another "
            "checkpoint (--resume PATH) or start afresh (--overwrite)"
        )
    return path


def read_state(checkpoint) -> dict:
    path = check_state_file(checkpoint)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint state {str(path)!r} cannot be read ({type(e).__name__}: {e}); resume "
            "from another checkpoint (--resume PATH) or start afresh (--overwrite)"
        ) from None


def check_compatible(saved: dict, cfg, checkpoint) -> None:
    """A CheckpointError naming every setting in which ``cfg`` differs from the run that
    saved ``checkpoint`` (model, adapters, method, resolved loss options, EMA teacher)."""
    known = {k: v for k, v in saved.items() if k in cfg.to_dict()}
    known.update(resume=None, overwrite=False, compare=None)
    try:
        before = cfg.replace(**known)
    except ValueError as e:
        raise CheckpointError(f"checkpoint config {str(checkpoint)!r}: {e}") from None
    diffs = [
        f"{name} {getattr(before, name)!r} -> {getattr(cfg, name)!r}"
        for name in FIXED
        if _key(name, getattr(before, name)) != _key(name, getattr(cfg, name))
    ]
    if not diffs and cfg.method != "sft" and before.loss_config() != cfg.loss_config():
        old, new = before.loss_config().__dict__, cfg.loss_config().__dict__
        diffs += [f"{k} {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k]]
    if before.ema_settings() != cfg.ema_settings():
        diffs.append(f"EMA teacher (beta, every) {before.ema_settings()} -> {cfg.ema_settings()}")
    if diffs:
        raise CheckpointError(
            f"--resume continues the run saved in {str(checkpoint)!r}, but this run differs in: "
            + "; ".join(diffs)
            + ". Resume with the checkpoint's settings, or start a new run in another "
            "--output-dir"
        )


def _key(name: str, value):
    """What must match: a model by its last path part (a folder may move, and the facts
    task's base model lives in each run's own output folder), other settings exactly."""
    return Path(str(value)).name if name == "model" else value


def continue_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the learning rate of the next step from this run's schedule: a resumed state holds
    the last rate of the saved run, which ends at 0 when that run finished its steps, while
    the schedule (over a larger ``max_steps``) continues from its step."""
    step = scheduler.last_epoch
    pairs = zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    lrs = [base * fn(step) for base, fn in pairs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
