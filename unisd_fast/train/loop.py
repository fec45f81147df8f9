"""unisd-train: on-policy self-distillation (UniSD and its baselines) of a causal LM.

One optimizer step (:mod:`.step`): sample a completion y per prompt from the student for
every micro-batch, then for each score [teacher prompt, y], the K views and the negative
without gradient, forward the student on [prompt, y], and backpropagate its share of the
step's loss over y's positions (exact across micro-batches and ranks); then clip, AdamW,
cosine schedule, and the EMA teacher update. Under torchrun the student is wrapped by DDP or
sharded by FSDP2 (:mod:`.distributed`).

``run(cfg)`` is the programmatic entry (it returns a summary dict): it locks the output
folder, checks the environment, data and resumed checkpoint before building anything, runs
the task's one-off preparation, then ``train``. ``cli.main(argv)`` parses the command line
into a TrainConfig and calls it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import dcp
from . import distributed as distributed_
from .checkpoint import (
    find_checkpoint,
    list_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig
from .evaluate import evaluate, limit_eval_prompts
from .guard import StepGuard, check_finite
from .lock import output_dir_lock
from .models.tiny import build_tiny_model, build_tokenizer
from .preflight import preflight
from .prompts import PromptEncoder
from .resume import check_compatible, check_state_file, continue_schedule, read_config, read_state
from .rollout import generation_config
from .step import StepMemory, StepSetup, accumulate
from .tasks import Task, builtin_task, load_task, prepare_task
from .teachers import EMATeacher, Runner, Scorer

log = logging.getLogger("unisd_fast.train")


@dataclass
class Item:
    """A training example, tokenized: student, teacher and negative prompts, gold completion."""

    index: int
    student: list[int]
    teacher: list[int]
    negative: list[int] | None
    gold: list[int]


@dataclass
class Context:
    cfg: TrainConfig
    student: torch.nn.Module
    tokenizer: object
    encode: PromptEncoder
    device: torch.device
    pad_id: int
    eos_ids: list[int]
    greedy: object
    sampling: object


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def resolve_attn(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(cfg: TrainConfig, device: torch.device):
    """(tokenizer, model): the tiny model built from its config, or a pretrained one."""
    dtype, attn = resolve_dtype(cfg, device), resolve_attn(cfg, device)
    if cfg.model == "tiny":
        tokenizer = build_tokenizer()
        model = build_tiny_model(
            tokenizer,
            arch=cfg.tiny_arch,
            hidden_size=cfg.tiny_hidden_size,
            num_layers=cfg.tiny_layers,
            seed=cfg.seed,
            attn_implementation=attn,
        )
    else:
        from transformers import AutoModelForCausalLM

        from .models.tiny import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, dtype=dtype, attn_implementation=attn
        )
    return tokenizer, model.to(device=device, dtype=dtype)


def add_lora(model, cfg: TrainConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs peft (pip install peft), or pass --lora-r 0") from None
    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def eos_ids_of(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer and model define no end-of-sequence token")
    return ids


def prepare_items(task: Task, encode: PromptEncoder, cfg: TrainConfig, eos_id: int, contrastive):
    """Tokenize the training set, dropping examples without a negative (when the contrastive
    term is on) and those whose teacher or negative prompt exceeds max_prompt_tokens."""
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
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * num_items / (cfg.batch_size * cfg.grad_accum * world)))


def cosine_with_warmup(total: int, warmup_ratio: float):
    warmup = int(round(warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def view_prompts(ctx: Context, task: Task, items: list[Item], schedule: Schedule, positions):
    """K view prompts per position, one other example as reference in each, laid out
    view-major (row k * B + b) and left-truncated to max_prompt_tokens."""
    k, limit = ctx.cfg.num_views, ctx.cfg.max_prompt_tokens
    per_item = []
    for pos in positions:
        own = schedule.index(pos)
        ex = task.train[items[own].index]
        refs = [task.train[items[r].index] for r in schedule.references(pos, own, k)]
        texts = [task.templates.view_text(ex.prompt, [(r.prompt, r.demonstration)]) for r in refs]
        per_item.append([ctx.encode(t)[-limit:] for t in texts])
    return [per_item[b][v] for v in range(k) for b in range(len(positions))]


class Metrics:
    """metrics.jsonl: one JSON object per training step and per evaluation."""

    def __init__(self, path: Path | None, records: list[dict]):
        """``path`` None: keep the records without writing (ranks other than 0)."""
        self.path, self.records = path, records
        if path is not None:
            path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def trainable_state(student, lora: bool) -> dict:
    if not lora:
        return student.state_dict()
    return {n: p.detach() for n, p in student.named_parameters() if p.requires_grad}


def load_trainable_state(student, state: dict, lora: bool) -> None:
    if not lora:
        student.load_state_dict(state)
        return
    result = student.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"checkpoint holds unknown student weights: {result.unexpected_keys[:3]}")


def check_output_dir(cfg: TrainConfig):
    """(checkpoint to resume from or None, stale checkpoints to delete); an error when the
    output dir holds checkpoints and neither resume nor overwrite is set."""
    out = Path(cfg.output_dir)
    resume_from = find_checkpoint(cfg.resume, out) if cfg.resume else None
    stale = list_checkpoints(out) if resume_from is None else []
    if stale and not cfg.overwrite:
        raise FileExistsError(
            f"output_dir {str(out)!r} already holds checkpoints ({stale[-1].name}); pass --resume "
            "to continue, --overwrite to start afresh, or another --output-dir"
        )
    return resume_from, stale


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


def append_summary(output_dir, record: dict) -> None:
    with (Path(output_dir) / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "summary", **record}) + "\n")


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
    cfg.validate()
    started = time.perf_counter()
    par = distributed_.setup(cfg.parallel, resolve_device(cfg))
    try:
        return _checked_run(cfg, task, sampler, started, par)
    finally:
        distributed_.teardown(par)


def _checked_run(cfg, task, sampler, started, par) -> dict:
    with output_dir_lock(cfg.output_dir), cpu_threads(cfg):
        resume_from, _ = check_output_dir(cfg)
        saved = None
        if resume_from is not None:
            saved = read_config(resume_from)
            check_state_file(resume_from)
        task = preflight(cfg, task)
        if par.is_main:
            cfg = prepare_task(cfg)
        distributed_.barrier(par)
        if not par.is_main:
            cfg = prepare_task(cfg)
        if saved is not None:
            check_compatible(saved, cfg, resume_from)
        prepare_s = time.perf_counter() - started
        summary = train(cfg, task, sampler, par)
        summary.update(prepare_s=prepare_s, total_wall_time_s=time.perf_counter() - started)
        if not par.is_main:
            return summary
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


def train(cfg: TrainConfig, task: Task | None = None, sampler=None, par=None) -> dict:
    """The training itself (see :func:`run`, which checks and prepares first); ``par``: this
    process's place under torchrun (default: a single process)."""
    cfg.validate()
    if par is None:
        par = distributed_.setup(cfg.parallel, resolve_device(cfg))
        try:
            return train(cfg, task, sampler, par)
        finally:
            distributed_.teardown(par)
    started = time.perf_counter()
    device = distributed_.local_device(resolve_device(cfg), par)
    main = par.is_main
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_from, stale = check_output_dir(cfg)
    distributed_.barrier(par)
    if main:
        for path in stale:
            shutil.rmtree(path)
        log.info("resolved config:\n%s", json.dumps(cfg.to_dict(), indent=2))
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer, model = load_model(cfg, device)
    lora = cfg.lora_r > 0
    sft = cfg.method == "sft"
    loss_cfg = None if sft else cfg.loss_config()
    ema_settings = cfg.ema_settings()
    task = task if task is not None else load_task(cfg.data, cfg.eval_data, cfg.eval_size, cfg.seed)

    frozen_copy = None if lora else copy.deepcopy(model).requires_grad_(False)
    teacher_copy = copy.deepcopy(model) if ema_settings is not None else None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if lora:
            model.enable_input_require_grads()
    student = add_lora(model, cfg) if lora else model
    student.train()
    eos_ids = eos_ids_of(tokenizer, student)
    runner = distributed_.wrap(Runner(student), par, device, trainable=True)
    own = distributed_.unwrap(runner)
    ema = None
    if teacher_copy is not None:
        ema = EMATeacher(distributed_.wrap(Runner(teacher_copy), par, device, False), *ema_settings)
    if frozen_copy is not None:
        frozen_copy = distributed_.wrap(Runner(frozen_copy), par, device, trainable=False)
    for r in (own, frozen_copy, ema.model if ema is not None else None):
        if r is not None:
            r.sync_generation = par.mode == "fsdp" and par.world_size > 1
    base = Scorer(own, disable_adapter=True) if lora else Scorer(frozen_copy)
    teacher = Scorer(ema.model) if ema is not None else base
    if par.rank:
        random.seed(cfg.seed + par.rank)
        torch.manual_seed(cfg.seed + par.rank)

    encode = PromptEncoder(tokenizer, cfg.chat_template)
    task = limit_eval_prompts(task, encode, cfg.max_prompt_tokens, cfg.eval_teacher)
    pad_id = tokenizer.pad_token_id
    ctx = Context(
        cfg,
        own,
        tokenizer,
        encode,
        device,
        pad_id,
        eos_ids,
        greedy=generation_config(cfg.max_new_tokens, pad_id, eos_ids),
        sampling=generation_config(cfg.max_new_tokens, pad_id, eos_ids, cfg.sample_temperature),
    )
    contrastive = loss_cfg is not None and loss_cfg.needs_negative
    items = prepare_items(task, encode, cfg, eos_ids[0], contrastive)
    schedule = Schedule(len(items), cfg)
    steps = total_steps(cfg, len(items), par.world_size)
    setup = StepSetup(
        runner,
        teacher,
        loss_cfg,
        par,
        cfg.loss_path,
        sampler,
        views=lambda positions: view_prompts(ctx, task, items, schedule, positions),
    )

    params = [p for p in runner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(steps, cfg.warmup_ratio)
    )

    step, records, checkpoint = 0, [], None
    if resume_from is not None:
        if par.mode == "fsdp":
            state = dcp.load(resume_from, runner, optimizer, ema, par)
            if ema is not None:
                ema.num_updates = state["ema_updates"]
        else:
            state = read_state(resume_from)
            load_trainable_state(student, state["student"], lora)
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
        scheduler.load_state_dict(state["scheduler"])
        continue_schedule(scheduler)
        if state.get("world_size", 1) != par.world_size:
            raise ValueError(
                f"resume: {resume_from} was written by {state.get('world_size', 1)} processes; "
                f"resume it with as many (this run has {par.world_size})"
            )
        step, records, checkpoint = state["step"], state["records"], resume_from
        set_rng_state(state.get("rng_ranks", [state["rng"]])[par.rank])
        log.info("resumed from %s at step %d", resume_from, step)
    metrics = Metrics(out / "metrics.jsonl" if main else None, list(records))
    guard = StepGuard(cfg.max_bad_steps, records)

    def do_eval():
        record = {
            "kind": "eval",
            "step": step,
            **evaluate(ctx, task, teacher if cfg.eval_teacher else None, base),
        }
        metrics.write(record)
        if main:
            log.info(
                "eval step %d: %s", step, {k: round(v, 4) for k, v in record.items() if k != "kind"}
            )

    def do_save():
        local = distributed_.local_tensor
        student_state = trainable_state(student, lora)
        check_finite({k: local(v) for k, v in student_state.items()}, f"the student at step {step}")
        if ema is not None:
            teacher_state = ema.state_dict()["model"]
            check_finite(
                {k: local(v) for k, v in teacher_state.items()}, f"the EMA teacher at step {step}"
            )
        rngs = distributed_.gather_objects(rng_state(), par)
        meta = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs,
            "world_size": par.world_size,
            "records": metrics.records,
        }
        if par.mode == "fsdp":
            meta["ema_updates"] = ema.num_updates if ema is not None else 0
            return dcp.save(
                out, step, runner, optimizer, ema, meta, cfg.to_dict(), cfg.keep_checkpoints, par
            )
        final = None
        if main:
            meta.update(
                student=trainable_state(student, lora),
                optimizer=optimizer.state_dict(),
                ema=ema.state_dict() if ema is not None else None,
            )
            final = save_checkpoint(out, step, meta, cfg.to_dict(), cfg.keep_checkpoints)
        distributed_.barrier(par)
        return distributed_.broadcast_object(final, par)

    if step == 0 and cfg.eval_at_start:
        do_eval()
    bar = tqdm(
        total=steps,
        initial=step,
        disable=not (cfg.progress and main),
        desc=cfg.method,
        dynamic_ncols=True,
    )
    memory = StepMemory(device)
    while step < steps:
        t0 = time.perf_counter()
        memory.start()
        optimizer.zero_grad(set_to_none=True)
        micro_batches = []
        for micro in range(cfg.grad_accum):
            positions = schedule.positions(step, micro, par.rank, par.world_size)
            micro_batches.append((positions, [items[schedule.index(p)] for p in positions]))
        record = {"kind": "train", "step": step + 1, **accumulate(ctx, setup, micro_batches)}
        grad_norm = distributed_.clip_grad_norm(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        nonfinite = guard.check([record["loss"]], grad_norm)
        if nonfinite == "none":
            optimizer.step()
            scheduler.step()
        else:
            log.warning("step %d skipped: non-finite %s", step + 1, nonfinite)
            with warnings.catch_warnings():  # torch's "scheduler before optimizer" warning
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
        step += 1
        ema_updated = False
        if ema is not None and nonfinite == "none":
            ema_updated = ema.maybe_update(own, step)
        elapsed = time.perf_counter() - t0
        tokens = record["tokens"]
        record.update(
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=tokens / elapsed,
            step_time_s=elapsed,
            peak_mem_mb=distributed_.all_reduce_max(memory.peak_mb(), par, device),
            ema_updated=ema_updated,
            skipped=nonfinite != "none",
            nonfinite=nonfinite,
            skipped_steps=guard.skipped,
        )
        metrics.write(record)
        guard.stop_if_diverged(step, nonfinite)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if step == steps or (cfg.eval_every and step % cfg.eval_every == 0):
            do_eval()
        if step == steps or (cfg.save_every and step % cfg.save_every == 0):
            checkpoint = do_save()
    bar.close()
    if cfg.save_final_model:
        state = distributed_.model_state(runner, par, trainable_only=False)
        if main:
            student.save_pretrained(out / "final_model", state_dict=state)
            tokenizer.save_pretrained(out / "final_model")
        distributed_.barrier(par)
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
