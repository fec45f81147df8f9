"""Training data: JSONL loading with clear errors, and the built-in offline tasks.

A JSONL line holds ``prompt`` and ``demonstration`` (strings) and optionally ``negative`` (a
wrong demonstration, for the contrastive teacher) and ``answer`` (what task accuracy compares
the greedy completion with; the demonstration when absent). Other keys are ignored.

``--data builtin`` resolves through :data:`DEFAULT_BUILTIN` in :data:`BUILTIN_TASKS`;
``--data builtin:NAME`` names one. A builtin task is a function ``(seed) -> Task``; register
a new one by adding it to :data:`BUILTIN_TASKS` (and point :data:`DEFAULT_BUILTIN` at it to
make it the default run).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .prompts import PromptTemplates


@dataclass(frozen=True)
class Example:
    prompt: str
    demonstration: str
    negative: str | None = None
    answer: str | None = None

    @property
    def target(self) -> str:
        return self.answer if self.answer is not None else self.demonstration


def exact_match(completion: str, example: Example) -> bool:
    """The default task score: the stripped completion equals the stripped target."""
    return completion.strip() == example.target.strip()


@dataclass
class Task:
    """What a run trains and evaluates on.

    score: ``(greedy completion text, example) -> bool``, averaged into task accuracy.
    retention_prompts: prompts on which the tuned model's greedy generations are scored by the
        frozen base model (KL, retention perplexity); the eval prompts when None.
    """

    name: str
    train: list[Example]
    eval: list[Example]
    score: Callable[[str, Example], bool] = exact_match
    retention_prompts: list[str] | None = None
    templates: PromptTemplates = field(default_factory=PromptTemplates)


class DataError(ValueError):
    """A data file is malformed; the message names the file, line and field."""


def load_jsonl(path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            examples.append(_example(record, where))
    if not examples:
        raise DataError(f"data file {str(path)!r} holds no example")
    return examples


def _example(record: dict, where: str) -> Example:
    values = {}
    for name in ("prompt", "demonstration", "negative", "answer"):
        value = record.get(name)
        required = name in ("prompt", "demonstration")
        if value is None:
            if required:
                raise DataError(f"{where}: missing field {name!r}")
            continue
        if not isinstance(value, str) or (required and not value.strip()):
            raise DataError(
                f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}"
            )
        values[name] = value
    return Example(**values)


def arithmetic_task(seed: int) -> Task:
    """Two-digit additions: the gold demonstration shows the sum, the negative a wrong one."""
    rng = random.Random(seed)
    pairs = rng.sample([(a, b) for a in range(10, 50) for b in range(10, 50)], 80)
    examples = []
    for a, b in pairs:
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        examples.append(
            Example(
                prompt=f"Q: {a}+{b}=?\nA: ",
                demonstration=f"{a}+{b}={a + b}",
                negative=f"{a}+{b}={wrong}",
                answer=f"{a}+{b}={a + b}",
            )
        )
    return Task(name="arithmetic", train=examples[:64], eval=examples[64:])


def facts_task(seed: int) -> Task:
    """The default run's task: see :mod:`unisd_fast.facts`."""
    from .facts import facts_task as build

    return build(seed)


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
    from .facts import TRAIN_DEFAULTS

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
