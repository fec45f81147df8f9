"""Where a run starts (docs/trainer.md, "Outputs", Resume): the checkpoint it resumes or the
stale ones it overwrites, reading a checkpoint with errors that name the file, refusing to
continue a different run, and the learning rate of the continued schedule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import find_checkpoint, list_checkpoints
from .errors import CheckpointError

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


@dataclass(frozen=True)
class Start:
    """Where a run starts in its output folder: ``checkpoint`` (None: at step 0) and the
    config values it was saved with, or ``stale``, an earlier run's checkpoints that
    ``--overwrite`` deletes."""

    checkpoint: Path | None = None
    saved: dict | None = None
    stale: tuple[Path, ...] = ()


def find_start(cfg) -> Start:
    """The Start of ``cfg``'s run, after the cheap checks of a resumed checkpoint (its config
    read, its state file present); FileExistsError when the output folder holds checkpoints
    and neither ``resume`` nor ``overwrite`` is set."""
    out = Path(cfg.output_dir)
    if cfg.resume:
        checkpoint = find_checkpoint(cfg.resume, out)
        saved = read_config(checkpoint)
        check_state_file(checkpoint)
        return Start(checkpoint, saved)
    stale = tuple(list_checkpoints(out))
    if stale and not cfg.overwrite:
        raise FileExistsError(
            f"output_dir {str(out)!r} already holds checkpoints ({stale[-1].name}); pass --resume "
            "to continue, --overwrite to start afresh, or another --output-dir"
        )
    return Start(stale=stale)


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
    if not diffs and before.loss_config() != cfg.loss_config():  # same method: both None or set
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
