"""UniSDConfig: every option of the UniSD loss (docs/losses.md), validated, and the constants
shared by every layer (the one module of the package that the API, the autograd layer and
the backends all import; it imports nothing of the package and no torch)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

DIVERGENCES = ("fkl", "rkl", "jsd")
AGREEMENTS = ("none", "token", "sequence")
AGREEMENT_STATS = ("var", "range")
NORMALIZATIONS = ("sequence", "token")
# Implementations of the losses: "auto" (Triton on CUDA tensors, the PyTorch path elsewhere),
# "triton", "torch" (the PyTorch passes) and "reference" (the eager float64-capable form).
IMPLS = ("auto", "triton", "torch", "reference")

# Lower bounds of the token agreement scale s and of the sequence agreement weight w_b.
AGREEMENT_SCALE_FLOOR = 1e-6
SEQUENCE_WEIGHT_FLOOR = 1e-6
# Least tail-bucket mass of a sparse support: the captured log-mass log P is clamped at
# -1e-7 before the tail log(1 - P) is formed (as TRL's add_tail_bucket), so the tail's
# log-probability stays finite when the support holds all the mass.
TAIL_LOG_MASS_CAP = -1e-7
# A given teacher support may hold this much more than probability 1 (rounding).
SUPPORT_MASS_SLACK = 1e-4

PRESETS: dict[str, dict] = {
    "sd": {},
    "gkd": {"divergence": "jsd", "jsd_alpha": 0.5},
    "clip": {"clip": 10.0},
    "agreement": {"agreement": "token", "agreement_gamma": 0.01},
    "contrastive": {"contrastive_weight": 0.1, "contrastive_margin": 0.5},
    "match": {"feature_weight": 0.1},
    "match_repr": {"kd_weight": 0.0, "feature_weight": 1.0},
    "unisd_star": {
        "agreement": "token",
        "agreement_gamma": 0.001,
        "contrastive_weight": 0.01,
        "contrastive_margin": 0.1,
        "feature_weight": 0.01,
    },
}


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"UniSDConfig.{name} must be one of {choices}, got {value!r}")


def _finite(name: str, value, *, positive=False, nonnegative=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"UniSDConfig.{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"UniSDConfig.{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"UniSDConfig.{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"UniSDConfig.{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class UniSDConfig:
    """Options of the UniSD loss. Defaults are plain self-distillation (forward KL, tau 0.7).

    divergence: "fkl" KL(p_T||p_S), "rkl" KL(p_S||p_T) or "jsd" (generalised, ``jsd_alpha``).
    temperature: logit temperature tau of student, teacher and negative.
    clip / clip_quantile: clamp the per-token divergence at a constant, or at the
        q-quantile of the batch's unmasked divergences; clipped tokens give no gradient.
    agreement: "none", "token" or "sequence" weighting from K >= 2 teacher views, scored at
        ``view_temperature``; ``agreement_stat`` "var" or "range"; token weights are
        max(1 / (1 + gamma * min(d / s, cap)), floor) with s the ``agreement_quantile``
        of the batch's disagreements. ``agreement_coverage`` c in (0, 1]: the callers that
        run the view forwards (trainer, TRL drop-in) score them only on the sequences
        holding the largest share c of the batch's divergence mass (1: every sequence); the
        loss takes the scored positions as ``view_mask`` (docs/losses.md, "Adaptive
        agreement"). A "sequence" weight is constant over a sequence, so
        with normalize="sequence" it cancels in that sequence's weighted mean (unless the
        weight sum falls below 1): it is offered as defined, like the paper's code.
    contrastive_weight / contrastive_margin: token hinge against a negative teacher.
    feature_weight: MSE between student and teacher last hidden states.
    kd_weight: weight of the divergence term (0 gives representation matching only).
    normalize: "sequence" (per-sequence masked means, then mean over sequences) or "token".
    ignore_index: label value of positions that take no part in the loss.
    topk: the divergence over the student's top-k tokens only (TRL's ``topk_logits``), the
        teacher's log-probs taken at those indices; None: the full vocabulary. A support
        given as indices and teacher log-probs (``unisd_loss(teacher_indices=...)``) needs
        topk None.
    importance_clip: TRL SDFT's ``distillation_is_clip``: each token's loss times the
        constant min(exp(clamp(log p_S(y) - old_logprobs, -20, 20)), importance_clip), with
        ``old_logprobs`` (B, T) the student's label log-probs when the rollout was sampled
        (given to the loss) and log p_S(y) at the loss temperature; None: off.
    tail_bucket: on a sparse support, one extra category holding 1 - sum p on each side
        (True), or each side renormalised over the support (False, TRL's default).
    """

    divergence: str = "fkl"
    jsd_alpha: float = 0.5
    temperature: float = 0.7
    clip: float | None = None
    clip_quantile: float | None = None
    agreement: str = "none"
    agreement_gamma: float = 1.0
    agreement_quantile: float = 0.95
    agreement_cap: float = 10.0
    agreement_floor: float = 0.01
    agreement_stat: str = "var"
    agreement_coverage: float = 1.0
    view_temperature: float = 1.0
    contrastive_weight: float = 0.0
    contrastive_margin: float = 0.5
    feature_weight: float = 0.0
    kd_weight: float = 1.0
    normalize: str = "sequence"
    ignore_index: int = -100
    topk: int | None = None
    tail_bucket: bool = False
    importance_clip: float | None = None

    def __post_init__(self) -> None:
        _choice("divergence", self.divergence, DIVERGENCES)
        _choice("agreement", self.agreement, AGREEMENTS)
        _choice("agreement_stat", self.agreement_stat, AGREEMENT_STATS)
        _choice("normalize", self.normalize, NORMALIZATIONS)
        _finite("jsd_alpha", self.jsd_alpha)
        if not 0.0 < self.jsd_alpha < 1.0:
            raise ValueError(
                f"UniSDConfig.jsd_alpha must lie in the open interval (0, 1), got "
                f"{self.jsd_alpha}; use divergence='fkl' or 'rkl' for the endpoints"
            )
        _finite("temperature", self.temperature, positive=True)
        _finite("view_temperature", self.view_temperature, positive=True)
        if self.clip is not None and self.clip_quantile is not None:
            raise ValueError("UniSDConfig.clip and UniSDConfig.clip_quantile are exclusive")
        if self.clip is not None:
            _finite("clip", self.clip)
            if self.clip <= 0:
                raise ValueError(
                    f"UniSDConfig.clip must be > 0, got {self.clip}; clip=0 clips every token "
                    "and zeroes the divergence term (use clip=None for no clipping)"
                )
        if self.clip_quantile is not None:
            _finite("clip_quantile", self.clip_quantile)
            if not 0.0 < self.clip_quantile <= 1.0:
                raise ValueError(
                    f"UniSDConfig.clip_quantile must lie in (0, 1], got {self.clip_quantile}; "
                    "at 0 every token above the batch minimum is clipped and gets no gradient"
                )
        _finite("agreement_gamma", self.agreement_gamma, nonnegative=True)
        _finite("agreement_quantile", self.agreement_quantile)
        if not 0.0 <= self.agreement_quantile <= 1.0:
            raise ValueError(
                f"UniSDConfig.agreement_quantile must lie in [0, 1], got "
                f"{self.agreement_quantile}"
            )
        _finite("agreement_coverage", self.agreement_coverage)
        if not 0.0 < self.agreement_coverage <= 1.0:
            raise ValueError(
                f"UniSDConfig.agreement_coverage must lie in (0, 1], got "
                f"{self.agreement_coverage}"
            )
        if self.agreement_coverage < 1.0 and self.agreement == "none":
            raise ValueError(
                "UniSDConfig.agreement_coverage < 1 selects the sequences the views score; it "
                "needs agreement='token' or 'sequence'"
            )
        _finite("agreement_cap", self.agreement_cap, positive=True)
        _finite("agreement_floor", self.agreement_floor)
        if not 0.0 < self.agreement_floor <= 1.0:
            raise ValueError(
                f"UniSDConfig.agreement_floor must lie in (0, 1], got {self.agreement_floor}"
            )
        for name in ("contrastive_weight", "contrastive_margin", "feature_weight", "kd_weight"):
            _finite(name, getattr(self, name), nonnegative=True)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(
                f"UniSDConfig.ignore_index must be an int, got {type(self.ignore_index).__name__}"
            )
        if self.topk is not None and (isinstance(self.topk, bool)
                                      or not isinstance(self.topk, int) or self.topk < 1):
            raise ValueError(f"UniSDConfig.topk must be an int >= 1 or None, got {self.topk!r}")
        if not isinstance(self.tail_bucket, bool):
            raise TypeError(f"UniSDConfig.tail_bucket must be a bool, got "
                            f"{type(self.tail_bucket).__name__}")
        if self.importance_clip is not None:
            _finite("importance_clip", self.importance_clip, positive=True)
        if self.kd_weight == 0 and self.contrastive_weight == 0 and self.feature_weight == 0:
            raise ValueError(
                "UniSDConfig: kd_weight, contrastive_weight and feature_weight are all 0; "
                "the loss would be identically zero"
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> UniSDConfig:
        """The named preset of docs/losses.md, with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_validated_fields(cls, **fields) -> UniSDConfig:
        """The config whose fields are those of a config already validated (an operator's
        arguments): built without checking them again."""
        config = object.__new__(cls)
        for f in dataclasses.fields(cls):
            object.__setattr__(config, f.name, fields[f.name])
        return config

    def replace(self, **changes) -> UniSDConfig:
        return dataclasses.replace(self, **changes)

    @property
    def needs_views(self) -> bool:
        return self.agreement != "none"

    @property
    def needs_negative(self) -> bool:
        return self.contrastive_weight > 0

    @property
    def needs_hidden(self) -> bool:
        return self.feature_weight > 0
