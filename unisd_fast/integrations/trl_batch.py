"""Batch pieces the TRL integration adds to a rollout batch (docs/trl.md): the privileged
contexts of the agreement views, left-padded view stacks and per-step loss-token counts."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

MAX_DRAWS = 1000


def other_contexts(
    dataset, prompts: Sequence, num_views: int, rng: random.Random
) -> list[list]:
    """For each prompt, ``num_views`` privileged contexts of random dataset rows whose prompt
    differs from it (with replacement across views). ``dataset`` needs the columns
    ``prompt`` and ``privileged_context``."""
    size = len(dataset)
    rows = []
    for prompt in prompts:
        chosen = []
        for _ in range(MAX_DRAWS):
            row = dataset[rng.randrange(size)]
            if row["prompt"] != prompt:
                chosen.append(row["privileged_context"])
                if len(chosen) == num_views:
                    break
        else:
            raise ValueError(
                "agreement views need training examples with other prompts: found too few "
                f"rows whose prompt differs from {prompt!r}"
            )
        rows.append(chosen)
    return rows


def stack_left_padded(
    pieces: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K (ids, mask) pairs of shape (B, L_k) left-padded to one width: (B, K, L) each."""
    width = max(ids.size(1) for ids, _ in pieces)
    ids = [F.pad(ids, (width - ids.size(1), 0), value=pad_id) for ids, _ in pieces]
    masks = [F.pad(mask, (width - mask.size(1), 0), value=0) for _, mask in pieces]
    return torch.stack(ids, dim=1), torch.stack(masks, dim=1)


def step_token_counts(
    loss_mask: torch.Tensor,
    steps_per_generation: int,
    accumulation_steps: int,
    gather: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Per row of a rollout batch, the number of loss tokens of its optimizer step over all
    processes: the batch splits into ``steps_per_generation`` equal slices along dim 0, and
    each run of ``accumulation_steps`` consecutive slices is one optimizer step.

    ``gather`` concatenates a tensor over processes along dim 0 (``accelerator.gather``).
    """
    rows = loss_mask.size(0)
    if rows % steps_per_generation or steps_per_generation % accumulation_steps:
        raise ValueError(
            f"a rollout batch of {rows} rows cannot split into {steps_per_generation} slices "
            f"grouped by {accumulation_steps} accumulation steps"
        )
    per_slice = loss_mask.reshape(steps_per_generation, -1).sum(dim=1).to(torch.float32)
    per_slice = gather(per_slice).reshape(-1, steps_per_generation).sum(dim=0)
    per_step = per_slice.reshape(-1, accumulation_steps).sum(dim=1)
    return per_step.repeat_interleave(rows // steps_per_generation * accumulation_steps)
