"""AdamW over the student's trainable parameters, with linear warmup then a cosine decay."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def cosine_with_warmup(total: int, warmup_ratio: float):
    """The learning-rate factor of step s: (s + 1) / W over the W = round(ratio * total)
    warmup steps, then 0.5 (1 + cos(pi * progress)) down to 0 at ``total``."""
    warmup = int(round(warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def build_optimizer(cfg: TrainConfig, runner: torch.nn.Module, steps: int):
    """(trainable parameters, AdamW, its LambdaLR schedule over ``steps``)."""
    params = [p for p in runner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = cosine_with_warmup(steps, cfg.warmup_ratio)
    return params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
