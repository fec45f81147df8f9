"""Sampling completions from a causal LM, and the padding helpers around it."""

from __future__ import annotations

import torch
from transformers import GenerationConfig


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (len(rows), max length), rows aligned on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attn[i, width - len(r) :] = 1
    return ids.to(device), attn.to(device)


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, bool mask), each (len(rows), max length), rows aligned on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


def completion_mask(completion: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """True up to and including each row's first end-of-sequence token."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    return (is_eos.long().cumsum(1) - is_eos.long()) == 0


def generation_config(max_new_tokens: int, pad_id: int, eos_ids: list[int], temperature=None):
    """Sampling at ``temperature`` with top_p 1 and no top-k, or greedy when it is None."""
    sampling = {"do_sample": False}
    if temperature is not None:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids, **sampling
    )


@torch.no_grad()
def generate(model, prompts: list[list[int]], gen_config: GenerationConfig, device):
    """Completions (B, T) of the left-padded prompts and their mask (B, T) bool."""
    ids, attn = left_pad(prompts, gen_config.pad_token_id, device)
    out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen_config)
    completion = out[:, ids.shape[1] :]
    eos = gen_config.eos_token_id
    return completion, completion_mask(completion, eos if isinstance(eos, list) else [eos])
