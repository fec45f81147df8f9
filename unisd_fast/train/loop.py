"""unisd-train: on-policy self-distillation (UniSD and its baselines) of a causal LM.

One optimizer step (:mod:`.step`): sample a completion y per prompt from the student for
every micro-batch, then for each score [teacher prompt, y], the K views and the negative
without gradient, forward the student on [prompt, y], and backpropagate its share of the
step's loss over y's positions (exact across micro-batches and ranks); then clip, AdamW,
cosine schedule, and the EMA teacher update. Under torchrun the student is wrapped by DDP or
sharded by FSDP2 (:mod:`.distributed`).

``run(cfg)`` is the programmatic entry (it returns a summary dict): it locks the output
folder, checks the environment, data and resumed checkpoint before building anything, runs
the task's one-off preparation, then ``train``, which builds the run phase by phase (models,
data, optimizer, resumed state) and loops over the steps. ``cli.main(argv)`` parses the
command line into a TrainConfig and calls it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed, saving
from .config import TrainConfig
from .data import Data, build_data, total_steps
from .distributed import Parallel
from .evaluate import evaluate, limit_eval_prompts
from .guard import StepGuard
from .lock import output_dir_lock
from .metrics import Metrics, append_summary
from .models.load import eos_ids_of, load_model, resolve_device
from .optimizer import build_optimizer
from .preflight import check_environment, checked_task
from .prompts import PromptEncoder
from .resume import Start, check_compatible, find_start
from .roles import Roles, build_roles
from .rollout import generation_config
from .step import StepMemory, StepSetup, accumulate
from .tasks import Task, builtin_task, prepare_task

log = logging.getLogger("unisd_fast.train")


@dataclass
class Context:
    """What sampling, scoring and evaluation read: the config, the student's runner, the
    tokenizer and prompt encoder, the device, and the greedy and sampling set-ups."""

    cfg: TrainConfig
    student: torch.nn.Module
    tokenizer: object
    encode: PromptEncoder
    device: torch.device
    pad_id: int
    eos_ids: list[int]
    greedy: object
    sampling: object


def build_context(cfg: TrainConfig, roles: Roles, tokenizer, device: torch.device) -> Context:
    eos_ids, pad_id = eos_ids_of(tokenizer, roles.student), tokenizer.pad_token_id
    return Context(
        cfg,
        roles.own,
        tokenizer,
        PromptEncoder(tokenizer, cfg.chat_template),
        device,
        pad_id,
        eos_ids,
        greedy=generation_config(cfg.max_new_tokens, pad_id, eos_ids),
        sampling=generation_config(cfg.max_new_tokens, pad_id, eos_ids, cfg.sample_temperature),
    )


@contextlib.contextmanager
def cpu_threads(cfg: TrainConfig):
    """The task's intra-op thread count for the block (CPU runs, OMP_NUM_THREADS unset)."""
    entry = builtin_task(cfg.data)
    before = torch.get_num_threads()
    wanted = entry.cpu_threads if entry is not None else None
    if wanted and "OMP_NUM_THREADS" not in os.environ and resolve_device(cfg).type == "cpu":
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def deterministic_algorithms(cfg: TrainConfig):
    """``torch.use_deterministic_algorithms(True)`` for the block when ``cfg.deterministic``
    (on CUDA, cuBLAS then needs CUBLAS_WORKSPACE_CONFIG, set here unless given, before
    cuBLAS starts); the previous setting after it."""
    before = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def run(cfg: TrainConfig, task: Task | None = None, sampler=None) -> dict:
    """Train as ``cfg`` says and return a summary: ``output_dir``, ``step``, ``train`` (the
    last step's metrics), ``first_eval`` and ``eval`` (first and last evaluation records),
    ``checkpoint`` (last checkpoint folder), ``wall_time_s`` (training), ``prepare_s`` (the
    task's preparation) and ``total_wall_time_s``; the same goes to metrics.jsonl as a
    ``summary`` record. ``task`` replaces the one ``cfg.data`` names (:mod:`.tasks`).
    ``sampler`` ``(positions, items) -> completions`` (token lists) replaces sampling from the
    student (fixed completions). Under torchrun the process group is joined first
    (:mod:`.distributed`); rank 0 prepares the task before the other ranks.

    Before any model is built: the output folder is locked against other runs and cleared of
    an interrupted run's temporary folders, and the environment, the data and the resumed
    checkpoint are checked (:mod:`.preflight`, :mod:`.resume`)."""
    started = time.perf_counter()
    check_environment(cfg)
    par = distributed.setup(cfg.parallel, resolve_device(cfg), cfg.tensor_parallel)
    try:
        with output_dir_lock(cfg.output_dir), cpu_threads(cfg), deterministic_algorithms(cfg):
            return _prepared_run(cfg, task, sampler, par, started)
    finally:
        distributed.teardown(par)


def _prepared_run(cfg: TrainConfig, task, sampler, par: Parallel, started: float) -> dict:
    # Checks that need no model: where the run starts, the data.
    start = find_start(cfg)
    task = checked_task(cfg, task)
    # The task's one-off preparation, rank 0 first (the facts task pre-trains its base).
    if par.is_main:
        cfg = prepare_task(cfg)
    distributed.barrier(par)
    if not par.is_main:
        cfg = prepare_task(cfg)
    if start.saved is not None:
        check_compatible(start.saved, cfg, start.checkpoint)
    prepare_s = time.perf_counter() - started
    summary = train(cfg, task, sampler, par, start)
    summary.update(prepare_s=prepare_s, total_wall_time_s=time.perf_counter() - started)
    if par.is_main:
        append_summary(
            cfg.output_dir,
            {
                "method": cfg.method,
                "before": summary["first_eval"],
                "after": summary["eval"],
                "pretrain_s": prepare_s,
                "wall_time_s": summary["total_wall_time_s"],
            },
        )
    return summary


def train(cfg: TrainConfig, task: Task, sampler, par: Parallel, start: Start) -> dict:
    """The training itself, once :func:`run` has checked and prepared: ``task`` is the checked
    task, ``start`` where the run starts, ``par`` this process's place under torchrun."""
    started = time.perf_counter()
    device = distributed.local_device(resolve_device(cfg), par)
    out = Path(cfg.output_dir)

    # Output folder: the resolved config; an overwritten run's checkpoints go (rank 0).
    out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(par)
    if par.is_main:
        for path in start.stale:
            shutil.rmtree(path)
        log.info("resolved config:\n%s", json.dumps(cfg.to_dict(), indent=2))
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")

    # Models from the seed: the student, its teacher and the base; then rank r samples with
    # seed + r.
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer, model = load_model(cfg, device)
    roles = build_roles(cfg, model, par, device)
    if par.data_rank:  # the ranks of a tensor-parallel group sample alike
        random.seed(cfg.seed + par.data_rank)
        torch.manual_seed(cfg.seed + par.data_rank)
    ctx = build_context(cfg, roles, tokenizer, device)

    # Data: the evaluation prompts that fit, the training items and their seeded order.
    task = limit_eval_prompts(task, ctx.encode, cfg.max_prompt_tokens, cfg.eval_teacher)
    data = build_data(cfg, task, ctx.encode, ctx.eos_ids[0])
    steps = total_steps(cfg, len(data.items), par.data_world)
    setup = StepSetup(
        roles.runner, roles.teacher, cfg.loss_config(), par, cfg.loss_path, sampler, data.views
    )

    # Optimizer: AdamW over the trainable weights, warmup then cosine decay.
    params, optimizer, scheduler = build_optimizer(cfg, roles.runner, steps)

    # Resumed state: weights, optimizer, schedule, RNGs and the records so far.
    step, records = 0, []
    if start.checkpoint is not None:
        step, records = saving.restore(start.checkpoint, roles, optimizer, scheduler, par)
    metrics = Metrics(out / "metrics.jsonl" if par.is_main else None, list(records))
    guard = StepGuard(cfg.max_bad_steps, records)

    # The loop: one optimizer step at a time, evaluations and checkpoints on their schedule.
    checkpoint = start.checkpoint
    if step == 0 and cfg.eval_at_start:
        record_eval(ctx, data, roles, metrics, step, par.is_main)
    show = cfg.progress and par.is_main
    bar = tqdm(total=steps, initial=step, disable=not show, desc=cfg.method, dynamic_ncols=True)
    memory = StepMemory(device)
    while step < steps:
        record = optimizer_step(
            ctx, setup, data, roles, params, optimizer, scheduler, guard, memory, step
        )
        step += 1
        metrics.write(record)
        guard.stop_if_diverged(step, record["nonfinite"])
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if step == steps or (cfg.eval_every and step % cfg.eval_every == 0):
            record_eval(ctx, data, roles, metrics, step, par.is_main)
        if step == steps or (cfg.save_every and step % cfg.save_every == 0):
            checkpoint = saving.save(step, cfg, roles, optimizer, scheduler, metrics.records, par)
    bar.close()

    # The final model: the student's full weights and the tokenizer, by save_pretrained.
    if cfg.save_final_model:
        state = distributed.model_state(roles.runner, par, trainable_only=False)
        if par.is_main:
            roles.student.save_pretrained(out / "final_model", state_dict=state)
            tokenizer.save_pretrained(out / "final_model")
        distributed.barrier(par)
    evals = [r for r in metrics.records if r["kind"] == "eval"]
    trains = [r for r in metrics.records if r["kind"] == "train"]
    return {
        "output_dir": str(out),
        "step": step,
        "train": trains[-1] if trains else None,
        "first_eval": evals[0] if evals else None,
        "eval": evals[-1] if evals else None,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "wall_time_s": time.perf_counter() - started,
    }


def optimizer_step(
    ctx: Context,
    setup: StepSetup,
    data: Data,
    roles: Roles,
    params: list,
    optimizer,
    scheduler,
    guard: StepGuard,
    memory: StepMemory,
    step: int,
) -> dict:
    """Optimizer step ``step + 1``: the accumulated gradient, clipped, then AdamW, the schedule
    and the EMA update; a non-finite loss or gradient skips AdamW and the EMA (the schedule
    still advances, as the data order does). Returns the step's ``train`` record."""
    par = setup.par
    t0 = time.perf_counter()
    memory.start()
    optimizer.zero_grad(set_to_none=True)
    sums = accumulate(ctx, setup, data.micro_batches(step, par))
    grad_norm = distributed.clip_grad_norm(params, ctx.cfg.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    nonfinite = guard.check([sums["loss"]], grad_norm)
    if nonfinite == "none":
        optimizer.step()
        scheduler.step()
    else:
        log.warning("step %d skipped: non-finite %s", step + 1, nonfinite)
        with warnings.catch_warnings():  # torch's "scheduler before optimizer" warning
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    ema_updated = False
    if roles.ema is not None and nonfinite == "none":
        ema_updated = roles.ema.maybe_update(roles.own, step + 1)
    elapsed = time.perf_counter() - t0
    return {
        "kind": "train",
        "step": step + 1,
        **sums,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": sums["tokens"] / elapsed,
        "step_time_s": elapsed,
        "peak_mem_mb": distributed.all_reduce_max(memory.peak_mb(), par, ctx.device),
        "ema_updated": ema_updated,
        "skipped": nonfinite != "none",
        "nonfinite": nonfinite,
        "skipped_steps": guard.skipped,
    }


def record_eval(ctx: Context, data: Data, roles: Roles, metrics: Metrics, step: int, main: bool):
    """Evaluate the student (and the teacher, with ``eval_teacher``); record it, and log it
    on rank 0."""
    teacher = roles.teacher if ctx.cfg.eval_teacher else None
    record = {"kind": "eval", "step": step, **evaluate(ctx, data.task, teacher, roles.base)}
    metrics.write(record)
    if main:
        shown = {k: round(v, 4) for k, v in record.items() if k != "kind"}
        log.info("eval step %d: %s", step, shown)
