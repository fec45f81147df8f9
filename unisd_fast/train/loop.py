"""unisd-train: on-policy self-distillation (UniSD and its baselines) of a causal LM.

One optimizer step: for each micro-batch, sample a completion y per prompt from the student,
score [teacher prompt, y], the K views and the negative without gradient, forward the
student on [prompt, y], and backpropagate ``unisd_loss`` over y's positions divided by the
accumulation steps; then clip, AdamW, cosine schedule, and the EMA teacher update.

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
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import unisd_loss
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
from .rollout import generate, generation_config, right_pad
from .tasks import Task, builtin_task, load_task, prepare_task
from .teachers import EMATeacher, Scorer, completion_forward

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

    def positions(self, step: int, micro: int) -> list[int]:
        start = (step * self.cfg.grad_accum + micro) * self.cfg.batch_size
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


def total_steps(cfg: TrainConfig, num_items: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * num_items / (cfg.batch_size * cfg.grad_accum)))


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


def distill_micro(ctx, task, schedule, all_items, positions, teacher: Scorer, loss_cfg) -> dict:
    cfg = ctx.cfg
    items = [all_items[schedule.index(p)] for p in positions]
    with Scorer(ctx.student).active() as model:
        y, mask = generate(model, [it.student for it in items], ctx.sampling, ctx.device)
    labels = torch.where(mask, y, torch.full_like(y, loss_cfg.ignore_index))
    views = negative = teacher_hidden = None
    with teacher.active() as model:
        t_logits, t_hidden = completion_forward(
            model, [it.teacher for it in items], y, mask, ctx.pad_id
        )
        if loss_cfg.needs_hidden:
            teacher_hidden = t_hidden
        if loss_cfg.needs_views:
            rows = view_prompts(ctx, task, all_items, schedule, positions)
            v_logits, _ = completion_forward(model, rows, y, mask, ctx.pad_id)
            views = v_logits.view(cfg.num_views, len(items), *v_logits.shape[1:])
        if loss_cfg.needs_negative:
            negative, _ = completion_forward(
                model, [it.negative for it in items], y, mask, ctx.pad_id
            )
    s_logits, s_hidden = completion_forward(
        ctx.student, [it.student for it in items], y, mask, ctx.pad_id
    )
    out = unisd_loss(
        s_logits,
        t_logits,
        labels,
        view_logits=views,
        negative_logits=negative,
        student_hidden=s_hidden if loss_cfg.needs_hidden else None,
        teacher_hidden=teacher_hidden,
        config=loss_cfg,
        impl=cfg.loss_impl,
    )
    (out.loss / cfg.grad_accum).backward()
    m = mask.float()
    return {
        "loss": out.loss.item(),
        "kd": out.kd.item(),
        "contrastive": out.contrastive.item(),
        "feature": out.feature.item(),
        "mean_weight": ((out.token_weight * m).sum() / m.sum().clamp(min=1)).item(),
        "clipped_frac": ((out.clipped.float() * m).sum() / m.sum().clamp(min=1)).item(),
        "tokens": int(m.sum().item()),
    }


def sft_micro(ctx, items) -> dict:
    gold, mask = right_pad([it.gold for it in items], ctx.pad_id, ctx.device)
    logits, _ = completion_forward(
        ctx.student, [it.student for it in items], gold, mask, ctx.pad_id
    )
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), gold, reduction="none")
    m = mask.float()
    loss = ((nll * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    (loss / ctx.cfg.grad_accum).backward()
    return {"loss": loss.item(), "tokens": int(m.sum().item())}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Metrics:
    """metrics.jsonl: one JSON object per training step and per evaluation."""

    def __init__(self, path: Path, records: list[dict]):
        self.path, self.records = path, records
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    def write(self, record: dict) -> None:
        self.records.append(record)
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


def run(cfg: TrainConfig, task: Task | None = None) -> dict:
    """Train as ``cfg`` says and return a summary: ``output_dir``, ``step``, ``train`` (the
    last step's metrics), ``first_eval`` and ``eval`` (first and last evaluation records),
    ``checkpoint`` (last checkpoint folder), ``wall_time_s`` (training), ``prepare_s`` (the
    task's preparation) and ``total_wall_time_s``; the same goes to metrics.jsonl as a
    ``summary`` record. ``task`` replaces the one ``cfg.data`` names (:mod:`.tasks`).

    Before any model is built: the output folder is locked against other runs and cleared of
    an interrupted run's temporary folders, and the environment, the data and the resumed
    checkpoint are checked (:mod:`.preflight`, :mod:`.resume`)."""
    cfg.validate()
    started = time.perf_counter()
    with output_dir_lock(cfg.output_dir), cpu_threads(cfg):
        resume_from, _ = check_output_dir(cfg)
        saved = None
        if resume_from is not None:
            saved = read_config(resume_from)
            check_state_file(resume_from)
        task = preflight(cfg, task)
        cfg = prepare_task(cfg)
        if saved is not None:
            check_compatible(saved, cfg, resume_from)
        prepare_s = time.perf_counter() - started
        summary = train(cfg, task)
        summary.update(prepare_s=prepare_s, total_wall_time_s=time.perf_counter() - started)
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


def train(cfg: TrainConfig, task: Task | None = None) -> dict:
    """The training itself (see :func:`run`, which checks and prepares first)."""
    cfg.validate()
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_from, stale = check_output_dir(cfg)
    for path in stale:
        shutil.rmtree(path)
    log.info("resolved config:\n%s", json.dumps(cfg.to_dict(), indent=2))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg)
    tokenizer, model = load_model(cfg, device)
    lora = cfg.lora_r > 0
    sft = cfg.method == "sft"
    loss_cfg = None if sft else cfg.loss_config()
    ema_settings = cfg.ema_settings()
    task = task if task is not None else load_task(cfg.data, cfg.eval_data, cfg.eval_size, cfg.seed)

    frozen_copy = None if lora else copy.deepcopy(model).requires_grad_(False)
    ema = None
    if ema_settings is not None:
        ema = EMATeacher(copy.deepcopy(model), *ema_settings)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if lora:
            model.enable_input_require_grads()
    student = add_lora(model, cfg) if lora else model
    student.train()
    base = Scorer(student, disable_adapter=True) if lora else Scorer(frozen_copy)
    teacher = Scorer(ema.model) if ema is not None else base

    eos_ids = eos_ids_of(tokenizer, student)
    encode = PromptEncoder(tokenizer, cfg.chat_template)
    task = limit_eval_prompts(task, encode, cfg.max_prompt_tokens, cfg.eval_teacher)
    pad_id = tokenizer.pad_token_id
    ctx = Context(
        cfg,
        student,
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
    steps = total_steps(cfg, len(items))

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(steps, cfg.warmup_ratio)
    )

    step, records, checkpoint = 0, [], None
    if resume_from is not None:
        state = read_state(resume_from)
        load_trainable_state(student, state["student"], lora)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        continue_schedule(scheduler)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, records, checkpoint = state["step"], state["records"], resume_from
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", resume_from, step)
    metrics = Metrics(out / "metrics.jsonl", list(records))
    guard = StepGuard(cfg.max_bad_steps, records)

    def do_eval():
        record = {
            "kind": "eval",
            "step": step,
            **evaluate(ctx, task, teacher if cfg.eval_teacher else None, base),
        }
        metrics.write(record)
        log.info(
            "eval step %d: %s", step, {k: round(v, 4) for k, v in record.items() if k != "kind"}
        )

    def do_save():
        check_finite(trainable_state(student, lora), f"the student at step {step}")
        if ema is not None:
            check_finite(ema.model.state_dict(), f"the EMA teacher at step {step}")
        state = {
            "step": step,
            "student": trainable_state(student, lora),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": rng_state(),
            "records": metrics.records,
        }
        return save_checkpoint(out, step, state, cfg.to_dict(), cfg.keep_checkpoints)

    if step == 0 and cfg.eval_at_start:
        do_eval()
    bar = tqdm(
        total=steps, initial=step, disable=not cfg.progress, desc=cfg.method, dynamic_ncols=True
    )
    while step < steps:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        micro_stats = []
        for micro in range(cfg.grad_accum):
            positions = schedule.positions(step, micro)
            if sft:
                batch = [items[schedule.index(p)] for p in positions]
                micro_stats.append(sft_micro(ctx, batch))
            else:
                micro_stats.append(
                    distill_micro(ctx, task, schedule, items, positions, teacher, loss_cfg)
                )
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]
        nonfinite = guard.check([s["loss"] for s in micro_stats], grad_norm.item())
        if nonfinite == "none":
            optimizer.step()
        else:
            log.warning("step %d skipped: non-finite %s", step + 1, nonfinite)
        scheduler.step()
        step += 1
        ema_updated = False
        if ema is not None and nonfinite == "none":
            ema_updated = ema.maybe_update(student, step)
        elapsed = time.perf_counter() - t0
        tokens = sum(s.pop("tokens") for s in micro_stats)
        record = {"kind": "train", "step": step}
        for key in micro_stats[0]:
            record[key] = sum(s[key] for s in micro_stats) / len(micro_stats)
        record.update(
            lr=lr,
            grad_norm=grad_norm.item(),
            tokens=tokens,
            tokens_per_s=tokens / elapsed,
            step_time_s=elapsed,
            peak_mem_mb=peak_memory_mb(device),
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
        student.save_pretrained(out / "final_model")
        tokenizer.save_pretrained(out / "final_model")
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
