"""What a task is: examples and the Task record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..prompts import PromptTemplates


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
