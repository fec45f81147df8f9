"""Task registry: ``builtin:NAME`` tasks and JSONL files.

``--data builtin`` resolves through :data:`DEFAULT_BUILTIN` in :data:`BUILTIN_TASKS`;
``--data builtin:NAME`` names one; anything else is a JSONL path (:mod:`.jsonl`). A builtin
task is a function ``(seed) -> Task``; a :class:`BuiltinTask` adds its one-off preparation.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from . import facts
from .arithmetic import arithmetic_task
from .base import Example, Task, exact_match
from .jsonl import load_jsonl


@dataclass(frozen=True)
class BuiltinTask:
    """A registered task: ``load(seed) -> Task``; ``prepare(cfg) -> cfg``, run once by
    ``run`` before training (the facts task pre-trains its base model there); ``cpu_threads``,
    the intra-op threads of a CPU run when OMP_NUM_THREADS is unset (None: torch's choice)."""

    load: Callable[[int], Task]
    prepare: Callable | None = None
    cpu_threads: int | None = None

    def __call__(self, seed: int) -> Task:
        return self.load(seed)


BUILTIN_TASKS: dict[str, Callable[[int], Task]] = {
    "arithmetic": BuiltinTask(arithmetic_task),
    # One thread: the tiny model's matrices are too small to share, and on a busy 2-core
    # machine a second thread only waits on the first (measured 2-10x slower).
    "facts": BuiltinTask(facts.facts_task, prepare=facts.prepare, cpu_threads=1),
}
DEFAULT_BUILTIN = "facts"


def builtin_name(data: str) -> str | None:
    """The builtin task ``data`` names (``builtin`` or ``builtin:NAME``), else None."""
    if data == "builtin" or data.startswith("builtin:"):
        return data.partition(":")[2] or DEFAULT_BUILTIN
    return None


def builtin_task(data: str) -> BuiltinTask | None:
    """The registry entry ``data`` names as a BuiltinTask, or None for a JSONL path."""
    name = builtin_name(data)
    entry = BUILTIN_TASKS.get(name) if name is not None else None
    if entry is None:
        return None
    return entry if isinstance(entry, BuiltinTask) else BuiltinTask(entry)


def prepare_task(cfg):
    """``cfg`` after its task's one-off preparation (unchanged for tasks without one)."""
    entry = builtin_task(cfg.data)
    return entry.prepare(cfg) if entry is not None and entry.prepare is not None else cfg


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


__all__ = [
    "BUILTIN_TASKS",
    "BuiltinTask",
    "DataError",
    "Example",
    "Task",
    "builtin_name",
    "builtin_task",
    "exact_match",
    "load_jsonl",
    "load_task",
    "prepare_task",
]
