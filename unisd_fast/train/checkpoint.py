"""Atomic checkpoints and RNG state for exact resume.

A checkpoint is a folder ``checkpoint-NNNNNN`` holding ``state.pt`` (student weights that
train, optimizer, scheduler, EMA teacher, RNG states, metric records) and ``config.json``
(the resolved TrainConfig). It is written to a temporary folder and renamed into place, so
a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

PREFIX = "checkpoint-"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir) -> list[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_checkpoint(resume: str, output_dir) -> Path:
    """``resume``: a checkpoint folder, or ``latest`` for the newest one in ``output_dir``."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume: no checkpoint in {str(output_dir)!r}")
        return found[-1]
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"resume: {resume!r} is not a checkpoint folder (no state.pt)")
    return path


def save_checkpoint(output_dir, step: int, state: dict, config: dict, keep: int) -> Path:
    """Write atomically, then delete all but the newest ``keep`` checkpoints."""
    root = Path(output_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final
