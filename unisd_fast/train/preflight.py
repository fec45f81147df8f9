"""Checks that run before any model is built or any file is written: the device and loss
implementation against this machine, the optional dependencies, and the data (loaded, and
large enough for the method)."""

from __future__ import annotations

import importlib.util

import torch

from .. import resolve_impl
from .config import TrainConfig
from .errors import ConfigError, DataError
from .models.load import resolve_device
from .tasks import Task, load_task


def check_environment(cfg: TrainConfig) -> None:
    """ConfigError when this machine cannot run ``cfg``: the device, the loss implementation
    on it, peft for LoRA. Run first: the device is resolved from here on."""
    device = cfg.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r}: no CUDA device is available here "
                "(torch.cuda.is_available() is False); use --device cpu or auto"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
    elif device not in ("auto", "cpu"):
        try:
            torch.device(device)
        except RuntimeError as e:
            raise ConfigError(f"device {device!r} is not a torch device: {e}") from None
    resolved = resolve_device(cfg)
    try:
        resolve_impl(cfg.loss_impl, resolved)
    except RuntimeError:
        raise ConfigError(
            f"loss_impl {cfg.loss_impl!r} needs a CUDA device (the run is on {resolved.type}); "
            "use --loss-impl auto or torch on CPU"
        ) from None
    if cfg.lora_r > 0 and importlib.util.find_spec("peft") is None:
        raise ConfigError('LoRA needs peft (pip install "unisd-fast[train]"), or pass --lora-r 0')


def check_examples(cfg: TrainConfig, task: Task) -> None:
    """DataError when the training set cannot feed the method: examples without a negative
    are dropped under the contrastive term, and each of K views shows another example."""
    loss = cfg.loss_config()
    if loss is None:  # sft
        return
    usable = len(task.train)
    if loss.needs_negative:
        usable = sum(ex.negative is not None for ex in task.train)
        if not usable:
            raise DataError(
                f"task {task.name!r}: no training example has a 'negative', which the "
                "contrastive term needs (--contrastive-weight 0 turns it off)"
            )
    if loss.needs_views and usable <= cfg.num_views:
        raise DataError(
            f"task {task.name!r}: {cfg.num_views} teacher views need more than {cfg.num_views} "
            f"training examples (each view shows another one), got {usable}; add examples or "
            "lower --num-views"
        )


def checked_task(cfg: TrainConfig, task: Task | None = None) -> Task:
    """The task ``cfg.data`` names (or ``task``), loaded and checked against the method."""
    if task is None:
        task = load_task(cfg.data, cfg.eval_data, cfg.eval_size, cfg.seed)
    check_examples(cfg, task)
    return task
