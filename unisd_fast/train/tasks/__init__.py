"""Task registry: ``builtin:NAME`` tasks and JSONL files.

``--data builtin`` resolves through :data:`DEFAULT_BUILTIN` in :data:`BUILTIN_TASKS`;
``--data builtin:NAME`` names one; anything else is a JSONL path (:mod:`.jsonl`). A builtin
task is a function ``(seed) -> Task``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from .arithmetic import arithmetic_task
from .base import DataError, Example, Task, exact_match
from .facts import TRAIN_DEFAULTS, facts_task
from .jsonl import load_jsonl

BUILTIN_TASKS: dict[str, Callable[[int], Task]] = {
    "arithmetic": arithmetic_task,
    "facts": facts_task,
}
DEFAULT_BUILTIN = "facts"


def builtin_name(data: str) -> str | None:
    """The builtin task ``data`` names (``builtin`` or ``builtin:NAME``), else None."""
    if data == "builtin" or data.startswith("builtin:"):
        return data.partition(":")[2] or DEFAULT_BUILTIN
    return None


def builtin_defaults(data: str, model: str) -> dict:
    """TrainConfig values a builtin task runs best with on the tiny model (below explicit
    flags and config files): the facts task's schedule for the default run."""
    if model != "tiny" or builtin_name(data) != "facts":
        return {}
    return dict(TRAIN_DEFAULTS)


def load_task(data: str, eval_data: str | None, eval_size: int, seed: int) -> Task:
    """``data``: ``builtin``, ``builtin:NAME`` or a JSONL path. Without ``eval_data``, the
    last ``eval_size`` examples of a seeded shuffle of ``data`` are held out."""
    if data == "builtin" or data.startswith("builtin:"):
        name = data.partition(":")[2] or DEFAULT_BUILTIN
        if name not in BUILTIN_TASKS:
            raise DataError(
                f"unknown builtin task {name!r}; expected one of {tuple(BUILTIN_TASKS)}"
            )
        task = BUILTIN_TASKS[name](seed)
        if eval_data is not None:
            task.eval = load_jsonl(eval_data)
        return task
    examples = load_jsonl(data)
    if eval_data is not None:
        return Task(name=Path(data).stem, train=examples, eval=load_jsonl(eval_data))
    if len(examples) <= eval_size:
        raise DataError(
            f"data file {data!r} has {len(examples)} examples; holding out eval_size="
            f"{eval_size} leaves none to train on (lower --eval-size or pass --eval-data)"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    cut = len(examples) - eval_size
    return Task(
        name=Path(data).stem,
        train=[examples[i] for i in order[:cut]],
        eval=[examples[i] for i in order[cut:]],
    )


__all__ = ["BUILTIN_TASKS", "DataError", "Example", "Task", "exact_match", "load_jsonl",
           "load_task", "builtin_name"]
