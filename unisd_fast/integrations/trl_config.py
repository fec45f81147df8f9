"""UniSDSDFTConfig: TRL's SDFTConfig plus every UniSD loss option (docs/trl.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from trl.experimental.sdft import SDFTConfig

from ..config import IMPLS, PRESETS, UniSDConfig

LOSS_PATHS = ("auto", "linear", "logits")
MODES = ("topk_logits", "full_logits")
SDFT_ALPHA = next(f.default for f in dataclasses.fields(SDFTConfig)
                  if f.name == "distillation_alpha")

# UniSD option -> UniSDConfig field; a None value leaves the preset's (or the default) value.
OPTION_FIELDS = {
    "unisd_clip": "clip",
    "unisd_clip_quantile": "clip_quantile",
    "unisd_agreement": "agreement",
    "unisd_agreement_gamma": "agreement_gamma",
    "unisd_agreement_quantile": "agreement_quantile",
    "unisd_agreement_cap": "agreement_cap",
    "unisd_agreement_floor": "agreement_floor",
    "unisd_agreement_stat": "agreement_stat",
    "unisd_agreement_coverage": "agreement_coverage",
    "unisd_view_temperature": "view_temperature",
    "unisd_contrastive_weight": "contrastive_weight",
    "unisd_contrastive_margin": "contrastive_margin",
    "unisd_feature_weight": "feature_weight",
    "unisd_kd_weight": "kd_weight",
    "unisd_normalize": "normalize",
}


def divergence_of_alpha(alpha: float) -> dict:
    """TRL's ``distillation_alpha`` as UniSDConfig fields: 0 is forward KL(teacher||student),
    1 reverse KL(student||teacher), anything between the generalised JSD with that weight."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation_alpha must lie in [0, 1], got {alpha}")
    if alpha == 0.0:
        return {"divergence": "fkl"}
    if alpha == 1.0:
        return {"divergence": "rkl"}
    return {"divergence": "jsd", "jsd_alpha": alpha}


def alpha_of_divergence(cfg: UniSDConfig) -> float:
    return {"fkl": 0.0, "rkl": 1.0, "jsd": cfg.jsd_alpha}[cfg.divergence]


def _help(text: str) -> dict:
    return {"metadata": {"help": text}}


@dataclass
class UniSDSDFTConfig(SDFTConfig):
    """SDFTConfig whose loss is the UniSD loss. TRL's fields keep their meaning; the loss is
    set by ``distillation_alpha`` (divergence), ``unisd_temperature`` and the ``unisd_*``
    fields, which map one to one to UniSDConfig fields (docs/trl.md, docs/losses.md).

    TRL's defaults are SDFTConfig's: ``distillation_mode="topk_logits"`` (the student's top
    ``distillation_topk`` tokens, renormalised or with ``distillation_add_tail``),
    ``distillation_is_clip=2.0``; ``"full_logits"`` is the full-vocabulary loss;
    ``use_teacher_server`` takes the teacher's top-k from the server as a given support.
    ``distillation_alpha`` None: the divergence of ``unisd_preset``, or SDFT's default when
    no preset is given.
    """

    distillation_alpha: float | None = field(
        default=None,
        **_help(
            "Divergence as in TRL: 0 forward KL, 1 reverse KL, in between generalised JSD with "
            "that weight. None takes the divergence of `unisd_preset`, or SDFT's default "
            f"({SDFT_ALPHA}) without a preset."
        ),
    )
    unisd_preset: str | None = field(
        default=None, **_help(f"A UniSD preset, one of {tuple(PRESETS)}; fields override it.")
    )
    unisd_temperature: float | None = field(
        default=None,
        **_help("Loss temperature tau of student, teacher and negative; None uses `temperature`."),
    )
    unisd_clip: float | None = field(default=None, **_help("Static clip of D_i."))
    unisd_clip_quantile: float | None = field(
        default=None, **_help("Clip D_i at this batch quantile (exclusive with unisd_clip).")
    )
    unisd_agreement: str | None = field(
        default=None, **_help("Agreement weighting: 'none', 'token' or 'sequence'.")
    )
    unisd_num_views: int = field(
        default=3,
        **_help(
            "K teacher views for agreement; view k of an example is the teacher prompt with "
            "the privileged context of another training example (different prompt)."
        ),
    )
    unisd_agreement_gamma: float | None = field(default=None, **_help("Agreement gamma."))
    unisd_agreement_quantile: float | None = field(
        default=None, **_help("Quantile of the disagreements used as their scale.")
    )
    unisd_agreement_cap: float | None = field(default=None, **_help("Cap of d_i / scale."))
    unisd_agreement_floor: float | None = field(default=None, **_help("Least token weight."))
    unisd_agreement_stat: str | None = field(default=None, **_help("'var' or 'range'."))
    unisd_agreement_coverage: float | None = field(
        default=None,
        **_help(
            "Adaptive agreement: the views score only the sequences holding this share of "
            "the batch's divergence mass (1 = every sequence); the others weigh 1."
        ),
    )
    unisd_view_temperature: float | None = field(
        default=None, **_help("Temperature at which views score the completion tokens.")
    )
    unisd_contrastive_weight: float | None = field(
        default=None, **_help("Weight of the contrastive hinge (needs a negative context).")
    )
    unisd_contrastive_margin: float | None = field(default=None, **_help("Hinge margin."))
    unisd_negative_column: str = field(
        default="negative_context",
        **_help(
            "Dataset column holding a wrong privileged context per example; the negative "
            "teacher prompt is `teacher_prompt_template` with it."
        ),
    )
    unisd_feature_weight: float | None = field(
        default=None, **_help("Weight of last-hidden-state matching.")
    )
    unisd_kd_weight: float | None = field(default=None, **_help("Weight of the divergence term."))
    unisd_normalize: str | None = field(
        default=None,
        **_help(
            "'sequence' (TRL's reduction: per-sequence means, then batch mean) or 'token' "
            "(every loss token of the optimizer step, across processes, counts once)."
        ),
    )
    unisd_loss_path: str = field(
        default="auto",
        **_help(
            "'linear': fused lm_head + loss, never materialising logits; 'logits': the "
            "model's logits into unisd_loss; 'auto': linear where it applies."
        ),
    )
    unisd_impl: str = field(
        default="auto", **_help(f"Kernel implementation, one of {IMPLS}.")
    )

    def __post_init__(self):
        if self.unisd_preset is not None and self.unisd_preset not in PRESETS:
            raise ValueError(
                f"unisd_preset must be one of {tuple(PRESETS)} or None, got {self.unisd_preset!r}"
            )
        if self.distillation_alpha is None:
            self.distillation_alpha = SDFT_ALPHA if self.unisd_preset is None else \
                alpha_of_divergence(UniSDConfig.preset(self.unisd_preset))
        super().__post_init__()
        if self.distillation_mode not in MODES:
            raise ValueError(
                f"UniSDSDFTConfig.distillation_mode must be one of {MODES} (the UniSD loss "
                f"over a top-k support or the full vocabulary), got {self.distillation_mode!r}"
            )
        if self.distillation_mode == "topk_logits" and (
            isinstance(self.distillation_topk, bool)
            or not isinstance(self.distillation_topk, int)
            or self.distillation_topk < 1
        ):
            raise ValueError(
                "UniSDSDFTConfig.distillation_topk must be an int >= 1 with "
                f"distillation_mode='topk_logits', got {self.distillation_topk!r}"
            )
        if self.use_teacher_server and self.distillation_mode != "topk_logits":
            raise ValueError(
                "UniSDSDFTConfig.use_teacher_server needs distillation_mode='topk_logits': "
                "the server returns the teacher's top-k log-probs, not its full distribution"
            )
        if self.unisd_loss_path not in LOSS_PATHS:
            raise ValueError(
                f"UniSDSDFTConfig.unisd_loss_path must be one of {LOSS_PATHS}, "
                f"got {self.unisd_loss_path!r}"
            )
        if self.unisd_impl not in IMPLS:
            raise ValueError(
                f"UniSDSDFTConfig.unisd_impl must be one of {IMPLS}, got {self.unisd_impl!r}"
            )
        cfg = self.unisd_loss_config()
        if cfg.needs_views and self.unisd_num_views < 2:
            raise ValueError(
                f"UniSDSDFTConfig.unisd_num_views must be >= 2 with agreement, "
                f"got {self.unisd_num_views}"
            )
        whole_steps = self.steps_per_generation % self.gradient_accumulation_steps == 0
        if cfg.normalize == "token" and not whole_steps:
            raise ValueError(
                "UniSDSDFTConfig.unisd_normalize='token' needs steps_per_generation "
                f"({self.steps_per_generation}) to be a multiple of gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}), so one rollout batch holds whole "
                "optimizer steps whose loss tokens can be counted"
            )

    def unisd_loss_config(self) -> UniSDConfig:
        """The UniSDConfig these fields describe (validated)."""
        overrides = divergence_of_alpha(self.distillation_alpha)
        overrides["tail_bucket"] = self.distillation_add_tail
        if self.distillation_mode == "topk_logits" and not self.use_teacher_server:
            overrides["topk"] = self.distillation_topk
        overrides["temperature"] = (
            self.temperature if self.unisd_temperature is None else self.unisd_temperature
        )
        for option, name in OPTION_FIELDS.items():
            value = getattr(self, option)
            if value is not None:
                overrides[name] = value
        return UniSDConfig.preset(self.unisd_preset or "sd", **overrides)
