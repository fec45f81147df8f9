"""The built-in ``facts`` task: a teacher that reads a fact in its context teaches a student
that does not see it (the mechanism UniSD relies on, small enough for a laptop CPU).

A fact is ``key=code``: a random three-letter key and a random two-digit code. The base model
is a tiny LM pre-trained (once, cached in the output folder) on a corpus that teaches the
format and in-context copying but no fixed fact: every pre-training line draws a fresh key
and code, and shows either the matching reference (``#zok=47\\nzok=`` -> ``47``), another
key's reference (the code is then random) or no reference at all. The self-distillation set
is facts whose keys never occur in pre-training:

- student prompt ``zok=``: the base model can only guess (1% chance for a two-digit code);
- teacher prompt ``#zok=47\\nzok=``: the gold reference, which the base model copies;
- views ``#paz=12\\nzok=``: another fact's reference (no answer in it);
- negative ``#zok=83\\nzok=``: a wrong reference, which the base model copies too.

Accuracy is measured on the trained facts (the point is to move the fact from the teacher's
context into the student's weights); retention on prompts drawn from the pre-training
distribution.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.tiny import build_tiny_model, build_tokenizer
from ..prompts import PromptTemplates
from .base import Example, Task

log = logging.getLogger("unisd_fast.facts")

KEY_LENGTH = 3
CODE_DIGITS = 2
NUM_FACTS = 64
NUM_RETENTION_PROMPTS = 32
TEMPLATES = PromptTemplates(
    teacher="#{prompt}{demonstration}\n{prompt}",
    view_header="",
    view_reference="#{prompt}{demonstration}\n",
    view_task="{prompt}",
)
BASE_FOLDER = "base_model"
PRETRAIN_RECORD = "pretrain.json"


def random_key(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(KEY_LENGTH))


def random_code(rng: random.Random) -> str:
    return "".join(rng.choice(string.digits) for _ in range(CODE_DIGITS))


def wrong_code(rng: random.Random, code: str) -> str:
    while (other := random_code(rng)) == code:
        pass
    return other


def make_facts(num_facts: int, seed: int) -> list[tuple[str, str]]:
    """``num_facts`` (key, code) pairs with distinct keys, a function of the seed alone."""
    rng = random.Random(f"facts-{seed}")
    keys: dict[str, str] = {}
    while len(keys) < num_facts:
        keys.setdefault(random_key(rng), random_code(rng))
    return list(keys.items())


def prompt_of(key: str) -> str:
    return f"{key}="


def facts_task(seed: int, num_facts: int = NUM_FACTS) -> Task:
    """The self-distillation set; evaluation runs on the same (trained) facts."""
    rng = random.Random(f"negatives-{seed}")
    examples = [
        Example(prompt=prompt_of(k), demonstration=c, negative=wrong_code(rng, c))
        for k, c in make_facts(num_facts, seed)
    ]
    keys = {k for k, _ in make_facts(num_facts, seed)}
    retention = random.Random(f"retention-{seed}")
    prompts = [pretraining_pair(retention, keys)[0] for _ in range(NUM_RETENTION_PROMPTS)]
    return Task(
        name="facts",
        train=examples,
        eval=list(examples),
        retention_prompts=prompts,
        templates=TEMPLATES,
    )


def pretraining_pair(rng: random.Random, exclude: set[str]) -> tuple[str, str]:
    """One (prompt, completion) of the pre-training corpus, on a fresh key not in ``exclude``:
    half with the matching reference (copy it), a quarter with another key's reference and a
    quarter bare (the code is then random: nothing to learn but the format)."""
    while (key := random_key(rng)) in exclude:
        pass
    code = random_code(rng)
    kind = rng.random()
    if kind < 0.5:
        return TEMPLATES.teacher_text(prompt_of(key), code), code
    if kind < 0.75:
        while (other := random_key(rng)) == key or other in exclude:
            pass
        return TEMPLATES.view_text(prompt_of(key), [(prompt_of(other), random_code(rng))]), code
    return prompt_of(key), code


@dataclass(frozen=True)
class PretrainConfig:
    """The base model and its pre-training; a cached base is reused only when equal.

    Pre-training runs until the base copies held-out references: every ``check_every`` steps
    its greedy copying accuracy on ``num_heldout`` references of keys that neither the corpus
    nor the facts use is measured, and it stops once ``checks_in_a_row`` consecutive checks
    reach ``target_copy`` (:class:`CopyingStop`), at ``max_steps`` at the latest (warmup, then
    a constant learning rate: the stop, not a schedule, ends it)."""

    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 2
    max_steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    check_every: int = 100
    target_copy: float = 0.99
    checks_in_a_row: int = 2
    num_heldout: int = 256
    seed: int = 42
    num_facts: int = NUM_FACTS

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "check_every", "checks_in_a_row", "num_heldout"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PretrainConfig.{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.target_copy <= 1.0:
            raise ValueError(
                f"PretrainConfig.target_copy must be in [0, 1], got {self.target_copy!r}"
            )


@dataclass
class CopyingStop:
    """The stopping rule of pre-training: stop once the held-out copying accuracy reached
    ``target`` at ``in_a_row`` consecutive checks. ``checks`` holds every (step, accuracy)."""

    target: float
    in_a_row: int
    checks: list[tuple[int, float]] = field(default_factory=list)

    def update(self, step: int, accuracy: float) -> bool:
        """Record the check at ``step``; True when pre-training should stop."""
        self.checks.append((step, accuracy))
        return self.reached

    @property
    def reached(self) -> bool:
        """The last ``in_a_row`` checks all reached ``target``."""
        recent = self.checks[-self.in_a_row :]
        return len(recent) == self.in_a_row and all(a >= self.target for _, a in recent)


def heldout_references(cfg: PretrainConfig) -> list[Example]:
    """``cfg.num_heldout`` facts whose keys are not the self-distillation facts' keys: the
    references on which pre-training measures copying (the corpus never draws these keys)."""
    facts = {k for k, _ in make_facts(cfg.num_facts, cfg.seed)}
    rng = random.Random(f"heldout-{cfg.seed}")
    keys: dict[str, str] = {}
    while len(keys) < cfg.num_heldout:
        if (key := random_key(rng)) not in facts:
            keys.setdefault(key, random_code(rng))
    return [Example(prompt=prompt_of(k), demonstration=c) for k, c in keys.items()]


def batch_tensors(pairs, tokenizer):
    """Right-padded ids, attention mask and labels (completion and end token only)."""
    rows, labels = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100)
    for i, (r, y) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)], attn[i, : len(r)], lab[i, : len(y)] = torch.tensor(r), 1, torch.tensor(y)
    return ids, attn, lab


def pretrain_model(cfg: PretrainConfig, progress=None):
    """(tokenizer, model, stop): the base pre-trained on the corpus of
    :func:`pretraining_pair` until ``stop`` (a :class:`CopyingStop`, with its checks) says so
    or ``cfg.max_steps``; ``progress(step, loss, copy)`` is called at each check."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(
        tokenizer,
        arch=cfg.arch,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        seed=cfg.seed,
    )
    heldout = heldout_references(cfg)
    exclude = {k for k, _ in make_facts(cfg.num_facts, cfg.seed)}
    exclude |= {ex.prompt[:-1] for ex in heldout}
    rng = random.Random(f"pretrain-{cfg.seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / cfg.warmup_steps)
    )
    stop = CopyingStop(cfg.target_copy, cfg.checks_in_a_row)
    for step in range(1, cfg.max_steps + 1):
        model.train()
        ids, attn, labels = batch_tensors(
            [pretraining_pair(rng, exclude) for _ in range(cfg.batch_size)], tokenizer
        )
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % cfg.check_every == 0 or step == cfg.max_steps:
            copy = greedy_accuracy(model.eval(), tokenizer, heldout, reference=True)
            if progress is not None:
                progress(step, loss.item(), copy)
            if stop.update(step, copy):
                break
    return tokenizer, model.eval(), stop


def pretrained_base(output_dir, cfg: PretrainConfig) -> Path:
    """The pre-trained base model folder under ``output_dir``: reused when its recorded
    PretrainConfig equals ``cfg``, else (re)built and written atomically. Its record holds
    the steps taken, every held-out copying check and whether the stop was reached."""
    folder = Path(output_dir) / BASE_FOLDER
    record = folder / PRETRAIN_RECORD
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["config"] == asdict(cfg):
            log.info("using the cached pre-trained base model %s", folder)
            if not saved["reached"]:
                warn_unreached(cfg, saved["checks"])
            return folder
    log.info(
        "pre-training the base model until it copies %.0f%% of %d held-out references at %d "
        "checks in a row (every %d steps, at most %d steps; once, cached in %s)",
        100 * cfg.target_copy,
        cfg.num_heldout,
        cfg.checks_in_a_row,
        cfg.check_every,
        cfg.max_steps,
        folder,
    )
    started = time.perf_counter()

    def progress(step, loss, copy):
        log.info("pre-training step %d: loss %.4f, held-out copying %.1f%%", step, loss, 100 * copy)

    tokenizer, model, stop = pretrain_model(cfg, progress)
    steps, reached = stop.checks[-1][0], stop.reached
    if not reached:
        warn_unreached(cfg, stop.checks)
    task = facts_task(cfg.seed, cfg.num_facts)
    check = {
        "recall": greedy_accuracy(model, tokenizer, task.train, reference=False),
        "copy": greedy_accuracy(model, tokenizer, task.train, reference=True),
    }
    log.info(
        "base model after %d steps, on the self-distillation facts: %.1f%% without reference, "
        "%.1f%% copying the reference",
        steps,
        100 * check["recall"],
        100 * check["copy"],
    )
    tmp = folder.with_name(f".tmp-{BASE_FOLDER}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    seconds = time.perf_counter() - started
    result = {"steps": steps, "reached": reached, "checks": stop.checks, **check}
    (tmp / PRETRAIN_RECORD).write_text(
        json.dumps({"config": asdict(cfg), "seconds": seconds, **result})
    )
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log.info("pre-training took %.1f s", seconds)
    return folder


def warn_unreached(cfg: PretrainConfig, checks) -> None:
    step, copy = checks[-1]
    log.warning(
        "pre-training stopped at its cap of %d steps with held-out copying at %.1f%%, short of "
        "%.0f%% at %d checks in a row: the teacher will copy the references poorly and the "
        "student cannot exceed it (raise PretrainConfig.max_steps)",
        step,
        100 * copy,
        100 * cfg.target_copy,
        cfg.checks_in_a_row,
    )


@torch.no_grad()
def greedy_accuracy(model, tokenizer, examples, reference: bool, max_batch: int = 64) -> float:
    """Exact-match accuracy of greedy completions of the student prompts (``reference``
    false) or the teacher prompts (true)."""
    correct = 0
    for start in range(0, len(examples), max_batch):
        chunk = examples[start : start + max_batch]
        texts = [
            TEMPLATES.teacher_text(ex.prompt, ex.demonstration) if reference else ex.prompt
            for ex in chunk
        ]
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        out = model.generate(
            input_ids=ids,
            attention_mask=(ids != tokenizer.pad_token_id).long(),
            max_new_tokens=CODE_DIGITS + 1,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, ex in zip(out[:, width:].tolist(), chunk, strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            correct += text.strip() == ex.demonstration
    return correct / len(examples)


def uses_facts(cfg) -> bool:
    """True when ``cfg`` trains the tiny model on this task (the default run)."""
    return cfg.model == "tiny" and cfg.data in ("builtin", "builtin:facts")


def pretrain_config(cfg) -> PretrainConfig:
    return PretrainConfig(
        arch=cfg.tiny_arch,
        hidden_size=cfg.tiny_hidden_size,
        num_layers=cfg.tiny_layers,
        seed=cfg.seed,
    )


def prepare(cfg):
    """``cfg`` with ``model`` pointing at the pre-trained base (built once, then cached) when
    it trains the tiny model; a pretrained ``model`` is used as it is."""
    if not uses_facts(cfg):
        return cfg
    return cfg.replace(model=str(pretrained_base(cfg.output_dir, pretrain_config(cfg))))
