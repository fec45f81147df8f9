"""The step guard: a non-finite loss or gradient skips the optimizer and EMA update.

Skipped steps are counted in metrics.jsonl (``skipped``, ``nonfinite``, ``skipped_steps``);
after ``max_bad_steps`` consecutive ones the run stops with :class:`TrainingDiverged`. A
gradient norm of exactly 0 for many steps in a row (a saturated model, as after a far too
large learning rate) is warned about. :func:`check_finite` keeps non-finite weights out of
every checkpoint (docs/trainer.md, "One optimizer step").
"""

from __future__ import annotations

import logging
import math

import torch

from .errors import TrainingDiverged

ZERO_GRAD_STEPS = 5

log = logging.getLogger("unisd_fast.train")


class StepGuard:
    def __init__(self, max_bad_steps: int, records: list[dict] = ()):
        """``records``: the metric records of a resumed run, whose counts carry on."""
        self.max_bad_steps = max_bad_steps
        trains = [r for r in records if r.get("kind") == "train"]
        self.skipped = trains[-1].get("skipped_steps", 0) if trains else 0
        self.consecutive = 0
        for r in reversed(trains):
            if not r.get("skipped"):
                break
            self.consecutive += 1
        self.zero_grad_steps = 0

    def check(self, losses: list[float], grad_norm: float) -> str:
        """``"none"`` when the step may be applied, else what was non-finite (``"loss"`` or
        ``"gradient"``); counts it."""
        if not all(math.isfinite(x) for x in losses):
            kind = "loss"
        elif not math.isfinite(grad_norm):
            kind = "gradient"
        else:
            kind = "none"
        if kind == "none":
            self.consecutive = 0
            self.zero_grad_steps = self.zero_grad_steps + 1 if grad_norm == 0.0 else 0
            if self.zero_grad_steps == ZERO_GRAD_STEPS:
                log.warning(
                    "the gradient norm has been exactly 0 for %d steps: the model may have "
                    "saturated (a learning rate far too large?) and no longer learns",
                    ZERO_GRAD_STEPS,
                )
        else:
            self.skipped += 1
            self.consecutive += 1
        return kind

    def stop_if_diverged(self, step: int, kind: str) -> None:
        if self.consecutive >= self.max_bad_steps:
            raise TrainingDiverged(
                f"training stopped at step {step}: {self.consecutive} steps in a row had a "
                f"non-finite {kind} and were skipped (--max-bad-steps {self.max_bad_steps}); "
                "no update of them was applied and no checkpoint holds non-finite weights. "
                "Try a lower --lr, float32 or bfloat16 (--dtype), or check the data"
            )


def check_finite(named_tensors, what: str) -> None:
    """TrainingDiverged naming the first tensors of ``named_tensors`` (name -> tensor) with a
    NaN or infinite value; ``what`` says what they belong to."""
    bad = [
        name
        for name, t in named_tensors.items()
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise TrainingDiverged(
            f"{what} holds non-finite values ({', '.join(bad[:3])}{', ...' if bad[3:] else ''}); "
            "not saved. Try a lower --lr, float32 or bfloat16 (--dtype), or check the data"
        )
