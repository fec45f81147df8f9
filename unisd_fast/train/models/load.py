"""The run's model: device, dtype and attention resolved from the config, the tiny model or a
pretrained one, its LoRA adapters and its end-of-sequence tokens."""

from __future__ import annotations

import importlib.util

import torch

from ..config import TrainConfig
from .tiny import build_tiny_model, build_tokenizer, load_tokenizer


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
