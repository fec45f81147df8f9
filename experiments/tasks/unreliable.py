"""Variants of the facts task whose teacher can be wrong in controlled ways (docs/ablations.md).

The facts, the student prompts and the retention prompts are those of
:func:`facts.facts_task`; what changes is what the teacher roles read. Three knobs:

- ``wrong_frac``: this fraction of the facts (chosen by the seed, fixed per fact) carries a
  wrong code in its reference: the teacher prompt is ``#zok=83\\nzok=`` where the truth is
  47. The reference is the data, so the example's ``demonstration`` (what SFT trains on and
  the teacher reads) is the wrong code, and its ``answer`` (what accuracy scores) the truth.
- ``view_noise``: None keeps the facts task's views (other facts' references). A number p
  makes each view read the fact's own reference, with a wrong code with probability p,
  drawn per (fact, view) from the seed: the views then disagree with each other.
- ``distractors``: this many other facts' reference lines are put into every teacher (and
  negative) prompt, around the fact's own line at a position fixed per fact:
  ``#paz=12\\n#zok=47\\n#qux=80\\nzok=`` (the base model saw one reference line at most).

The ground truth stays known, so accuracy measures whether the student learned the truth
or the teacher's mistake; :class:`UnreliableTask` records which facts have a wrong teacher
context (``wrong_prompts``) so that the two can be scored apart.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from unisd_fast.train.prompts import PromptTemplates
from unisd_fast.train.tasks.base import Example, Task
from unisd_fast.train.tasks.facts import TEMPLATES, facts_task, wrong_code


@dataclass(frozen=True)
class Unreliability:
    """The knobs of the variant (module docstring); all off is the facts task itself."""

    wrong_frac: float = 0.0
    view_noise: float | None = None
    distractors: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.wrong_frac <= 1:
            raise ValueError(f"wrong_frac must lie in [0, 1], got {self.wrong_frac}")
        if self.view_noise is not None and not 0 <= self.view_noise <= 1:
            raise ValueError(f"view_noise must be None or lie in [0, 1], got {self.view_noise}")
        if self.distractors < 0:
            raise ValueError(f"distractors must be >= 0, got {self.distractors}")


@dataclass(frozen=True)
class UnreliableTemplates(PromptTemplates):
    """The facts templates, with distractor lines in the teacher prompt and (with
    ``view_noise``) views that read the fact's own, possibly wrong, reference."""

    truth: Mapping[str, str] = field(default_factory=dict)
    context: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    view_noise: float | None = None
    seed: int = 0

    def teacher_text(self, prompt: str, demonstration: str) -> str:
        before, after = self.context.get(prompt, ((), ()))
        lines = (*before, f"{prompt}{demonstration}", *after)
        return "".join(f"#{line}\n" for line in lines) + prompt

    def view_code(self, prompt: str, other: str) -> str:
        """The code the view of ``prompt`` that replaces ``other``'s reference reads."""
        rng = random.Random(f"view-{self.seed}-{prompt}-{other}")
        truth = self.truth[prompt]
        return wrong_code(rng, truth) if rng.random() < self.view_noise else truth

    def view_text(self, prompt: str, references) -> str:
        if self.view_noise is None or prompt not in self.truth:
            return super().view_text(prompt, references)
        own = [(prompt, self.view_code(prompt, other)) for other, _ in references]
        return super().view_text(prompt, own)


@dataclass
class UnreliableTask(Task):
    """A Task that knows which facts' teacher context is wrong."""

    wrong_prompts: frozenset[str] = frozenset()
    knobs: Unreliability = field(default_factory=Unreliability)


def _distractor_lines(others: list[tuple[str, str]], n: int, rng):
    """(lines before, lines after) the fact's own reference line: n other facts' lines."""
    lines = tuple(f"{p}{c}" for p, c in rng.sample(others, n))
    cut = rng.randint(0, n)
    return lines[:cut], lines[cut:]


def unreliable_task(seed: int, knobs: Unreliability | None = None, **values) -> UnreliableTask:
    """The facts task of ``seed`` with the teacher made unreliable as ``knobs`` (or the
    keyword values of :class:`Unreliability`) say."""
    knobs = knobs if knobs is not None else Unreliability(**values)
    base = facts_task(seed)
    truth = {ex.prompt: ex.demonstration for ex in base.train}
    rng = random.Random(f"wrong-{seed}")
    wrong = set(rng.sample(sorted(truth), round(knobs.wrong_frac * len(truth))))
    examples = []
    for ex in base.train:
        if ex.prompt not in wrong:
            examples.append(replace(ex, answer=ex.demonstration))
            continue
        reference = wrong_code(rng, ex.demonstration)
        negative = ex.negative
        while negative in (reference, ex.demonstration):
            negative = wrong_code(rng, ex.demonstration)
        examples.append(replace(ex, demonstration=reference, negative=negative,
                                answer=ex.demonstration))
    context = {}
    if knobs.distractors:
        if knobs.distractors >= len(examples):
            raise ValueError(
                f"distractors must be below the number of facts ({len(examples)}), got "
                f"{knobs.distractors}"
            )
        drng = random.Random(f"distractors-{seed}")
        pairs = [(ex.prompt, ex.demonstration) for ex in examples]
        for ex in examples:
            others = [p for p in pairs if p[0] != ex.prompt]
            context[ex.prompt] = _distractor_lines(others, knobs.distractors, drng)
    templates = UnreliableTemplates(
        teacher=TEMPLATES.teacher,
        view_header=TEMPLATES.view_header,
        view_reference=TEMPLATES.view_reference,
        view_task=TEMPLATES.view_task,
        truth=truth,
        context=context,
        view_noise=knobs.view_noise,
        seed=seed,
    )
    return UnreliableTask(
        name="facts_unreliable",
        train=examples,
        eval=list(examples),
        retention_prompts=base.retention_prompts,
        templates=templates,
        wrong_prompts=frozenset(wrong),
        knobs=knobs,
    )


def is_wrong(task: Task, example: Example) -> bool:
    """True when ``example``'s teacher context carries a wrong reference."""
    return example.prompt in getattr(task, "wrong_prompts", frozenset())
