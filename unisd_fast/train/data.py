"""The training data of a run: the task's examples tokenized into items, their seeded order
(the schedule), the micro-batches of a step and the teacher views of each example."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch

from .config import TrainConfig
from .distributed import Parallel
from .prompts import PromptEncoder
from .tasks import Task

log = logging.getLogger("unisd_fast.train")


@dataclass
class Item:
    """A training example, tokenized: student, teacher and negative prompts, gold completion."""

    index: int
    student: list[int]
    teacher: list[int]
    negative: list[int] | None
    gold: list[int]


def prepare_items(task: Task, encode: PromptEncoder, cfg: TrainConfig, eos_id: int) -> list[Item]:
    """Tokenize the training set, dropping examples without a negative (when the contrastive
    term is on) and those whose teacher or negative prompt exceeds max_prompt_tokens."""
    loss = cfg.loss_config()
    contrastive = loss is not None and loss.needs_negative
    items, no_negative, too_long = [], 0, 0
    for i, ex in enumerate(task.train):
        if contrastive and ex.negative is None:
            no_negative += 1
            continue
        teacher = encode(task.templates.teacher_text(ex.prompt, ex.demonstration))
        negative = None
        if ex.negative is not None:
            negative = encode(task.templates.teacher_text(ex.prompt, ex.negative))
        student = encode(ex.prompt)
        if max(len(student), len(teacher), len(negative or [])) > cfg.max_prompt_tokens:
            too_long += 1
            continue
        items.append(
            Item(i, student, teacher, negative, encode.completion(ex.demonstration, eos_id))
        )
    if no_negative or too_long:
        log.info(
            "dropped %d training examples without a negative, %d with a prompt over %d tokens",
            no_negative,
            too_long,
            cfg.max_prompt_tokens,
        )
    if not items:
        raise ValueError("no training example left after filtering")
    return items


class Schedule:
    """Which items a micro-batch takes: a stream over seeded per-epoch permutations, so the
    data order depends only on (seed, step) and resume needs no extra state."""

    def __init__(self, num_items: int, cfg: TrainConfig):
        self.n, self.cfg, self._perms = num_items, cfg, {}

    def positions(self, step: int, micro: int, rank: int = 0, world: int = 1) -> list[int]:
        """Rank ``rank``'s slice of micro-batch ``micro`` of global step ``step``: the global
        batch (batch_size x grad_accum x world) is consecutive in the stream, and its
        micro-batches are laid out micro-major, so one rank with grad_accum W*n sees the same
        micro-batches as W ranks with grad_accum n."""
        start = ((step * self.cfg.grad_accum + micro) * world + rank) * self.cfg.batch_size
        return list(range(start, start + self.cfg.batch_size))

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.cfg.seed + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._perms[epoch][offset]

    def references(self, position: int, own: int, k: int) -> list[int]:
        """k distinct other items for the views of the item at ``position``."""
        if self.n <= k:
            raise ValueError(f"{k} views need more than {k} training examples, got {self.n}")
        picks = random.Random(self.cfg.seed * 1_000_003 + position).sample(range(self.n - 1), k)
        return [p + (p >= own) for p in picks]


def total_steps(cfg: TrainConfig, num_items: int, world: int = 1) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` over the items."""
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * num_items / (cfg.batch_size * cfg.grad_accum * world)))


@dataclass
class Data:
    """The task (its evaluation prompts already fitted), its items and their schedule."""

    cfg: TrainConfig
    task: Task
    encode: PromptEncoder
    items: list[Item]
    schedule: Schedule

    def micro_batches(self, step: int, par: Parallel) -> list[tuple[list[int], list[Item]]]:
        """(stream positions, items) of each of this rank's micro-batches of ``step``."""
        batches = []
        for micro in range(self.cfg.grad_accum):
            positions = self.schedule.positions(step, micro, par.data_rank, par.data_world)
            batches.append((positions, [self.items[self.schedule.index(p)] for p in positions]))
        return batches

    def views(self, positions: list[int]) -> list[list[int]]:
        """K view prompts per position, one other example as reference in each, laid out
        view-major (row k * B + b) and left-truncated to max_prompt_tokens."""
        train, templates = self.task.train, self.task.templates
        k, limit = self.cfg.num_views, self.cfg.max_prompt_tokens
        per_item = []
        for pos in positions:
            own = self.schedule.index(pos)
            ex = train[self.items[own].index]
            refs = [train[self.items[r].index] for r in self.schedule.references(pos, own, k)]
            texts = [templates.view_text(ex.prompt, [(r.prompt, r.demonstration)]) for r in refs]
            per_item.append([self.encode(t)[-limit:] for t in texts])
        return [per_item[b][v] for v in range(k) for b in range(len(positions))]


def build_data(cfg: TrainConfig, task: Task, encode: PromptEncoder, eos_id: int) -> Data:
    items = prepare_items(task, encode, cfg, eos_id)
    return Data(cfg, task, encode, items, Schedule(len(items), cfg))
