"""The models of a run and the role each plays (docs/trainer.md, "Roles"): the student that
trains, the teacher that scores its completions, and the base model that retention is
measured against.

Without EMA the teacher is the base: under LoRA the student with its adapters disabled (no
extra memory), with full fine-tuning a frozen copy. With EMA the teacher is a separate copy
that follows the student. Each model is wrapped for this rank (DDP, FSDP2 or itself).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from . import distributed
from .config import TrainConfig
from .distributed import Parallel
from .models.load import add_lora
from .teachers import EMATeacher, Runner, Scorer


@dataclass
class Roles:
    student: nn.Module  # the (peft-wrapped) model whose weights train
    runner: nn.Module  # its Runner as this rank runs it (wrapped by DDP, or sharded)
    own: Runner  # that Runner unwrapped: what generation, evaluation and the EMA read
    teacher: Scorer
    base: Scorer
    ema: EMATeacher | None
    lora: bool


def build_roles(cfg: TrainConfig, model: nn.Module, par: Parallel, device) -> Roles:
    lora = cfg.lora_r > 0
    ema_settings = cfg.ema_settings()
    # The copies come first, while ``model`` is the plain base: the frozen base of full
    # fine-tuning and the EMA teacher's starting point.
    frozen = None if lora else copy.deepcopy(model).requires_grad_(False)
    teacher_copy = copy.deepcopy(model) if ema_settings is not None else None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if lora:
            model.enable_input_require_grads()
    student = add_lora(model, cfg) if lora else model
    student.train()
    runner = distributed.wrap(Runner(student), par, device, trainable=True)
    own = distributed.unwrap(runner)
    ema = None
    if teacher_copy is not None:
        ema = EMATeacher(distributed.wrap(Runner(teacher_copy), par, device, False), *ema_settings)
    if frozen is not None:
        frozen = distributed.wrap(Runner(frozen), par, device, trainable=False)
    for r in (own, frozen, ema.model if ema is not None else None):
        if r is not None:
            r.sync_generation = par.mode == "fsdp" and par.world_size > 1
    base = Scorer(own, disable_adapter=True) if lora else Scorer(frozen)
    teacher = Scorer(ema.model) if ema is not None else base
    return Roles(student, runner, own, teacher, base, ema, lora)
