"""Evaluation on held-out prompts: task accuracy with greedy decoding, and retention.

Retention (docs/trainer.md, "Outputs", the ``eval`` record) is measured on the tuned model's
greedy generations y: ``retention_ppl = mean_examples exp(-mean_t log p_base(y_t | x, y_<t))``
and ``kl_base``, the token mean of KL(p_tuned || p_base) over the same positions.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .rollout import generate
from .teachers import Scorer, completion_forward

log = logging.getLogger("unisd_fast.train")


def limit_eval_prompts(task, encode, limit: int, teacher: bool = True):
    """``task`` without the evaluation examples whose prompt (or teacher prompt, when the
    teacher is evaluated) is longer than ``limit`` tokens, and without such retention
    prompts: run once before any generation, so that no prompt outgrows the model's
    context or memory. The number dropped is logged."""

    def fits(text: str) -> bool:
        return len(encode(text)) <= limit

    kept = [
        ex
        for ex in task.eval
        if fits(ex.prompt)
        and (not teacher or fits(task.templates.teacher_text(ex.prompt, ex.demonstration)))
    ]
    retention = task.retention_prompts
    if retention is not None:
        retention = [p for p in retention if fits(p)]
    dropped = len(task.eval) - len(kept)
    dropped_retention = len(task.retention_prompts or ()) - len(retention or ())
    if dropped or dropped_retention:
        log.warning(
            "dropped %d evaluation examples and %d retention prompts longer than "
            "max_prompt_tokens=%d; %d evaluation examples left",
            dropped,
            dropped_retention,
            limit,
            len(kept),
        )
    return dataclasses.replace(task, eval=kept, retention_prompts=retention)


def _texts(tokenizer, completion, mask, eos_ids) -> list[str]:
    keep = mask & ~torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    return [
        tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
        for row, m in zip(completion, keep, strict=True)
    ]


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def evaluate(ctx, task, teacher: Scorer | None, base: Scorer) -> dict:
    """``ctx``: the run's context (student, tokenizer, encoder, greedy config, eos ids, cfg)."""
    metrics = {}
    student = Scorer(ctx.student)
    examples = task.eval
    if examples:
        correct, teacher_correct = 0, 0
        for chunk in _chunks(examples, ctx.cfg.eval_batch_size):
            with student.active() as model:
                y, mask = generate(
                    model, [ctx.encode(ex.prompt) for ex in chunk], ctx.greedy, ctx.device
                )
            texts = _texts(ctx.tokenizer, y, mask, ctx.eos_ids)
            correct += sum(task.score(t, ex) for t, ex in zip(texts, chunk, strict=True))
            if teacher is not None:
                prompts = [
                    ctx.encode(task.templates.teacher_text(ex.prompt, ex.demonstration))
                    for ex in chunk
                ]
                with teacher.active() as model:
                    y, mask = generate(model, prompts, ctx.greedy, ctx.device)
                texts = _texts(ctx.tokenizer, y, mask, ctx.eos_ids)
                teacher_correct += sum(
                    task.score(t, ex) for t, ex in zip(texts, chunk, strict=True)
                )
        metrics["accuracy"] = correct / len(examples)
        if teacher is not None:
            metrics["teacher_accuracy"] = teacher_correct / len(examples)
    prompts = task.retention_prompts
    if prompts is None:
        prompts = [ex.prompt for ex in examples]
    if prompts:
        metrics.update(retention(ctx, student, base, prompts))
    return metrics


def retention(ctx, student: Scorer, base: Scorer, prompts: list[str]) -> dict:
    ppl, kl_sum, tokens = [], 0.0, 0
    for chunk in _chunks(prompts, ctx.cfg.eval_batch_size):
        ids = [ctx.encode(p) for p in chunk]
        with student.active() as model:
            y, mask = generate(model, ids, ctx.greedy, ctx.device)
            tuned, _ = completion_forward(model, ids, y, mask, ctx.pad_id)
        with base.active() as model:
            ref, _ = completion_forward(model, ids, y, mask, ctx.pad_id)
        lp_tuned = torch.log_softmax(tuned.float(), -1)
        lp_base = torch.log_softmax(ref.float(), -1)
        m = mask.float()
        nll = -lp_base.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        ppl += torch.exp((nll * m).sum(1) / m.sum(1).clamp(min=1)).tolist()
        kl = (lp_tuned.exp() * (lp_tuned - lp_base)).sum(-1)
        kl_sum += (kl * m).sum().item()
        tokens += int(m.sum().item())
    return {"retention_ppl": sum(ppl) / len(ppl), "kl_base": kl_sum / max(tokens, 1)}
