"""The built-in arithmetic task: two-digit additions."""

from __future__ import annotations

import random

from .base import Example, Task


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
