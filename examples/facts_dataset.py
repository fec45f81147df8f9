"""The trainer's built-in facts task as a TRL self-distillation dataset, and a tiny model
saved where TRL can load it by path (its base and EMA teachers are built from the model's
path). Used by examples/trl_facts.py, tests/integrations/test_trl.py and
benchmarks/trl_bench.py (docs/trl.md, "Example"); imported as ``examples.facts_dataset``
with the repository root on the path."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from unisd_fast.train.models.tiny import build_tiny_model, build_tokenizer, load_tokenizer
from unisd_fast.train.tasks.facts import facts_task

# The facts teacher prompt "#zok=47\nzok=" in TRL's template syntax.
TEACHER_PROMPT_TEMPLATE = "#{prompt}{privileged_context}\n{prompt}"


def facts_dataset(seed: int, num_facts: int | None = None) -> Dataset:
    """Rows ``prompt`` (``zok=``), ``privileged_context`` (the code) and
    ``negative_context`` (a wrong code) of the facts task."""
    task = facts_task(seed) if num_facts is None else facts_task(seed, num_facts)
    return Dataset.from_list(
        [
            {
                "prompt": ex.prompt,
                "privileged_context": ex.demonstration,
                "negative_context": ex.negative,
            }
            for ex in task.train
        ]
    )


def save_tiny_model(folder, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> str:
    """A randomly initialised tiny Llama-style model and its tokenizer saved in ``folder``
    (kept when already there); returns the folder as a string."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        tokenizer = build_tokenizer()
        model = build_tiny_model(
            tokenizer, arch="llama", hidden_size=hidden_size, num_layers=num_layers, seed=seed
        )
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_tokenizer(folder):
    return load_tokenizer(str(folder))
