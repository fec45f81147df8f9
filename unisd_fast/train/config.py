"""TrainConfig: every option of ``unisd-train``, its command line and its config files.

Flags are generated from the fields (``lora_r`` -> ``--lora-r``); ``--config file.yaml|json``
supplies field values that explicit flags override. The loss fields are generated from
UniSDConfig's, one each; left at None they take the method's defaults (``--method``), and
setting one switches that mechanism on or off by itself. This module imports only the
standard library and ``unisd_fast.config`` (and yaml for a config file): the command line
reads its arguments before torch is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import (
    AGREEMENT_STATS,
    AGREEMENTS,
    DIVERGENCES,
    IMPLS,
    NORMALIZATIONS,
    PRESETS,
    UniSDConfig,
)
from .errors import ConfigError

METHODS = ("sft", "ema", *PRESETS)
EMA_DEFAULTS = {"ema": (0.9, 10), "unisd_star": (0.98, 10)}  # (beta, every); others: no EMA
# One optional TrainConfig field per UniSDConfig field (None: the method's value).
LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(UniSDConfig))
LOSS_HELP = {
    "divergence": "divergence",
    "jsd_alpha": "JSD alpha (with --divergence jsd)",
    "temperature": "logit temperature tau of the loss",
    "clip": "clip the per-token divergence at this value",
    "clip_quantile": "clip the divergence at this batch quantile",
    "agreement": "multi-teacher agreement weighting; bare --agreement = token",
    "agreement_gamma": "agreement gamma",
    "agreement_quantile": "quantile of the batch's disagreements that scales the agreement",
    "agreement_cap": "cap of the scaled disagreement in the agreement weight",
    "agreement_floor": "lower bound of the agreement weight",
    "agreement_stat": "disagreement statistic over the views",
    "agreement_coverage": "adaptive agreement: views score only the sequences holding this "
    "share of the divergence mass (1 = all)",
    "view_temperature": "temperature of the view log-probs",
    "contrastive_weight": "weight of the contrastive hinge (0 = off)",
    "contrastive_margin": "margin of the contrastive hinge",
    "feature_weight": "weight of hidden-state feature matching (0 = off)",
    "kd_weight": "weight of the divergence term",
    "normalize": "loss normalisation",
    "ignore_index": "label value of positions outside the loss",
}
LOSS_CHOICES = {
    "divergence": DIVERGENCES,
    "agreement": AGREEMENTS,
    "agreement_stat": AGREEMENT_STATS,
    "normalize": NORMALIZATIONS,
}

METHOD_DEFAULTED = (*LOSS_FIELDS, "ema_beta", "ema_every")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "facts.yaml"


def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


def _with_loss_fields(cls):
    """Insert the optional loss fields (one per UniSDConfig field) after ``method``."""
    annotations = {}
    for name, hint in cls.__annotations__.items():
        annotations[name] = hint
        if name != "method":
            continue
        for f in dataclasses.fields(UniSDConfig):
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            annotations[f.name] = kind if "None" in kind else f"{kind} | None"
            extra = {"choices": LOSS_CHOICES[f.name]} if f.name in LOSS_CHOICES else {}
            if f.name == "agreement":
                extra["const"] = "token"
            help_text = LOSS_HELP.get(f.name, f"UniSDConfig.{f.name} (docs/losses.md)")
            setattr(cls, f.name, _f(None, help_text, **extra))
    cls.__annotations__ = annotations
    return cls


@dataclass(frozen=True)
@_with_loss_fields
class TrainConfig:
    """Every option of a run; checked when built (``replace`` builds a new one), and frozen
    so that what was checked is what runs. The loss config is built once, here."""

    # model
    model: str = _f("tiny", "'tiny' (built locally, random init) or a transformers id/path")
    tiny_arch: str = _f("qwen2", "architecture of the tiny model", choices=("qwen2", "llama"))
    tiny_hidden_size: int = _f(64, "hidden size of the tiny model")
    tiny_layers: int = _f(2, "number of layers of the tiny model")
    device: str = _f("auto", "'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = _f(
        "auto",
        "model dtype; auto = bfloat16 on CUDA, float32 on CPU",
        choices=("auto", "float32", "bfloat16", "float16", "float64"),
    )
    attn_implementation: str = _f(
        "auto", "auto = flash_attention_2 when flash-attn is installed (CUDA), else sdpa"
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward")
    lora_r: int = _f(64, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: float = _f(128.0, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_target_modules: str = _f(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "comma-separated module names that get LoRA adapters",
    )
    # data
    data: str = _f(
        "builtin:arithmetic",
        "JSONL file (prompt, demonstration[, negative, answer]), or builtin:NAME of a built-in "
        "task (builtin alone: facts)",
    )
    eval_data: str | None = _f(None, "held-out JSONL; None: hold out --eval-size examples")
    eval_size: int = _f(16, "examples held out of --data for evaluation when no --eval-data")
    max_prompt_tokens: int = _f(
        3072, "drop examples whose teacher/negative prompt is longer; views are left-truncated"
    )
    max_new_tokens: int = _f(32, "completion length, in training and evaluation")
    chat_template: bool = _f(True, "wrap prompts in the tokenizer's chat template when it has one")
    # method and loss
    method: str = _f("unisd_star", "training method", choices=METHODS)
    num_views: int = _f(3, "number of teacher views K (with agreement)")
    ema_beta: float | None = _f(None, "EMA teacher beta; 0 = no EMA (ema: 0.9, unisd_star: 0.98)")
    ema_every: int | None = _f(None, "EMA update every n optimizer steps")
    loss_impl: str = _f("auto", "unisd_loss implementation", choices=IMPLS)
    loss_path: str = _f(
        "linear",
        "linear: the loss from lm_head inputs and head weights (unisd_linear_loss, no logits "
        "in the step); logits: heads applied, then unisd_loss",
        choices=("linear", "logits"),
    )
    parallel: str = _f(
        "auto",
        "none, ddp (DistributedDataParallel) or fsdp (FSDP2) under torchrun; auto = ddp when "
        "WORLD_SIZE > 1",
        choices=("auto", "none", "ddp", "fsdp"),
    )
    tensor_parallel: int = _f(
        1,
        "ranks the lm_head is split over by vocabulary rows (the loss combines their row "
        "statistics; the rest of the model is replicated in each group); data parallel "
        "(ddp) over the WORLD_SIZE / N groups; needs --loss-path linear",
    )
    sample_temperature: float = _f(0.7, "sampling temperature of the student's completions")
    # optimisation
    batch_size: int = _f(4, "prompts per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(2e-5, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.1, "fraction of the steps with linear warmup, then cosine")
    max_grad_norm: float = _f(1.0, "gradient-norm clip (0 = off)")
    max_steps: int = _f(0, "optimizer steps; 0 = --epochs over the training set")
    epochs: float = _f(1.0, "epochs when --max-steps is 0")
    seed: int = _f(42, "seed of the model init, data order, views and sampling")
    deterministic: bool = _f(
        False, "torch.use_deterministic_algorithms for the run, pre-training included"
    )
    max_bad_steps: int = _f(
        10, "stop after this many consecutive steps skipped for a non-finite loss or gradient"
    )
    # outputs
    output_dir: str = _f("runs/unisd", "metrics.jsonl, checkpoints and the final model go here")
    eval_every: int = _f(0, "evaluate every n steps (0 = only before and after training)")
    eval_at_start: bool = _f(True, "evaluate before the first step")
    eval_teacher: bool = _f(True, "also report the teacher's accuracy (greedy, with reference)")
    eval_batch_size: int = _f(16, "prompts per evaluation batch")
    save_every: int = _f(0, "checkpoint every n steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "number of checkpoints kept")
    save_final_model: bool = _f(True, "save_pretrained the student (and tokenizer) at the end")
    resume: str | None = _f(
        None,
        "continue from a checkpoint folder; bare --resume = latest in --output-dir",
        const="latest",
    )
    overwrite: bool = _f(
        False, "start afresh in an --output-dir that holds checkpoints (deletes them)"
    )
    progress: bool = _f(True, "show a tqdm progress bar")
    compare: str | None = _f(
        None,
        "comma-separated methods (e.g. sft,sd,unisd_star) trained one after another from the "
        "same base, each in <output-dir>/<method>; prints a table and plots compare.png",
    )

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and float in _types(hints[f.name])
            ):
                value = float(value)
                object.__setattr__(self, f.name, value)
            _check_type(f.name, value, hints[f.name])
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be finite, got {value}")
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{f.name} must be one of {choices}, got {value!r}")
        for name in (
            "tiny_hidden_size",
            "tiny_layers",
            "max_new_tokens",
            "batch_size",
            "grad_accum",
            "max_prompt_tokens",
            "eval_batch_size",
            "keep_checkpoints",
            "max_bad_steps",
            "tensor_parallel",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lora_r", "eval_size", "max_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "sample_temperature", "epochs"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lora_alpha", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.num_views < 2:
            raise ConfigError(
                f"num_views must be >= 2 (agreement needs K >= 2), got {self.num_views}"
            )
        if self.tensor_parallel > 1 and (self.loss_path != "linear"
                                         or self.parallel in ("none", "fsdp")):
            raise ConfigError(
                f"tensor_parallel={self.tensor_parallel} needs loss_path linear and parallel "
                f"auto or ddp, got loss_path {self.loss_path!r}, parallel {self.parallel!r}"
            )
        if self.ema_beta is not None and not 0 <= self.ema_beta < 1:
            raise ConfigError(f"ema_beta must lie in [0, 1), got {self.ema_beta}")
        if self.ema_every is not None and self.ema_every < 1:
            raise ConfigError(f"ema_every must be >= 1, got {self.ema_every}")
        for name in (self.compare or "").split(","):
            if self.compare is not None and name.strip() not in METHODS:
                raise ConfigError(f"compare: {name.strip()!r} is not a method of {METHODS}")
        self._check_combinations()
        object.__setattr__(self, "_loss", self._build_loss())

    def _check_combinations(self) -> None:
        if self.method == "sft":
            given = [n for n in METHOD_DEFAULTED if getattr(self, n) is not None]
            if given:
                flags = ", ".join("--" + n.replace("_", "-") for n in given)
                raise ConfigError(
                    f"method sft trains with cross-entropy on the demonstrations and takes no "
                    f"loss or EMA option; got {flags} (drop them or pick a distillation method)"
                )
        if self.resume is not None and self.overwrite:
            raise ConfigError(
                "resume and overwrite exclude each other: --resume continues the run in "
                "--output-dir, --overwrite deletes its checkpoints to start afresh"
            )
        if self.dtype == "float16" and self.lora_r == 0:
            raise ConfigError(
                "dtype float16 with full fine-tuning (lora_r 0) is refused: the weights, AdamW's "
                "state and its updates would all be float16, where AdamW's eps (1e-8) underflows "
                "to 0 and the weights turn NaN within a few steps (there is no float32 master "
                "copy or loss scaling); use --dtype bfloat16 or float32, or LoRA (--lora-r > 0, "
                "peft keeps the adapters in float32)"
            )

    def _build_loss(self) -> UniSDConfig | None:
        """The method's UniSDConfig preset with every loss field that is set overriding it."""
        if self.method == "sft":
            return None
        preset = "sd" if self.method == "ema" else self.method
        overrides = {n: getattr(self, n) for n in LOSS_FIELDS if getattr(self, n) is not None}
        try:
            return UniSDConfig.preset(preset, **overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e).replace("UniSDConfig.", "")) from None

    def loss_config(self) -> UniSDConfig | None:
        """The run's loss config (built and checked with this config); None for sft, which
        trains with cross-entropy on the demonstrations."""
        return self._loss

    def ema_settings(self) -> tuple[float, int] | None:
        """(beta, every) of the EMA teacher, or None when the teacher is frozen."""
        beta, every = method_ema(self.method)
        beta = beta if self.ema_beta is None else self.ema_beta
        every = every if self.ema_every is None else self.ema_every
        return (beta, every) if beta > 0 and self.method != "sft" else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def method_ema(method: str) -> tuple[float, int]:
    """The method's (ema_beta, ema_every); beta 0 is a frozen teacher."""
    return EMA_DEFAULTS.get(method, (0.0, 10))


def _types(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _check_type(name: str, value, hint) -> None:
    allowed = _types(hint)
    if value is None and type(None) in allowed:
        return
    ok = any(
        isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
        for t in allowed
        if t is not type(None)
    )
    if not ok:
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{name} must be {names}, got {value!r} ({type(value).__name__})")


def load_config_file(path) -> dict:
    """Field values from a YAML or JSON mapping; an unknown key is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:
        raise ConfigError(f"config file {str(path)!r} cannot be parsed: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in values:
        if key not in known:
            valid = ", ".join(sorted(known))
            raise ConfigError(f"unknown config key {key!r} in {str(path)!r}; valid keys: {valid}")
    return values


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown_default(bare: TrainConfig, name: str) -> str:
    """A field's default as ``--help`` shows it: its value in the default run; for a loss or
    EMA option that run leaves unset, the value its method gives."""
    value = getattr(bare, name)
    if value is not None or name not in METHOD_DEFAULTED:
        return str(value)
    if name in LOSS_FIELDS:
        value = getattr(bare.loss_config(), name)
    else:
        value = method_ema(bare.method)[("ema_beta", "ema_every").index(name)]
    return f"the method's, {bare.method}: {value}"


def _epilog(bare_values: dict) -> str:
    builtin = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    builtin.update(dict.fromkeys(METHOD_DEFAULTED, "(the method's)"))
    changed = [f"{_flag(n)} {builtin[n]}" for n, v in bare_values.items() if v != builtin[n]]
    return (
        "The defaults shown are those of the default run, the one the bare command makes: "
        f"the config file {DEFAULT_CONFIG} (UniSD* on the built-in facts task; a tiny model, "
        "pre-trained first, then fully fine-tuned). With --config, --data or --model that file "
        "is not read, and the fields it sets start from their built-in values instead: "
        + ", ".join(changed)
        + ". Loss and EMA options left unset take the method's value (docs/trainer.md, "
        '"Methods").'
    )


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's layout, wrapped between words only (a flag is never split at a hyphen)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text, width, indent):
        lines = self._split_lines(" ".join(text.split()), width - len(indent))
        return "\n".join(indent + line for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """One flag per field; each help ends with the field's value in the default run
    (:data:`DEFAULT_CONFIG`), and the epilog says which values change without it."""
    bare_values = load_config_file(DEFAULT_CONFIG)
    bare = TrainConfig(**bare_values)
    parser = argparse.ArgumentParser(
        prog="unisd-train",
        description="UniSD on-policy self-distillation of a causal LM (and its baselines).",
        epilog=_epilog(bare_values),
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON file of field values; flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = _flag(f.name)
        allowed = _types(hints[f.name])
        kind = next(t for t in allowed if t is not type(None))
        meta = f.metadata
        help_text = f"{meta['help']} (default: {_shown_default(bare, f.name)})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kwargs = {"help": help_text, "choices": meta.get("choices"), "dest": f.name}
        optional_number = type(None) in allowed and kind in (int, float)
        kwargs["type"] = _parse_optional(kind) if optional_number else kind
        if "const" in meta:
            kwargs.update(nargs="?", const=meta["const"])
        parser.add_argument(flag, **kwargs)
    return parser


def load_config(path, **overrides) -> TrainConfig:
    """TrainConfig from a YAML or JSON file of field values (the other fields at their
    defaults), with ``overrides`` on top: ``run(load_config(path))`` does what
    ``unisd-train --config path`` does."""
    return TrainConfig(**{**load_config_file(path), **overrides})


def parse_args(argv=None) -> TrainConfig:
    """TrainConfig from the command line. Precedence, lowest first: field defaults, the default
    run's file (:data:`DEFAULT_CONFIG`, only when none of ``--config``, ``--data`` and
    ``--model`` is given), the resumed checkpoint's config, the ``--config`` file, flags."""
    args = vars(build_parser().parse_args(argv))
    bare = not {"config", "data", "model"} & args.keys()
    values = load_config_file(args.pop("config")) if "config" in args else {}
    defaults = load_config_file(DEFAULT_CONFIG) if bare else {}
    values.update(args)
    if values.get("resume"):
        from .checkpoint import find_checkpoint  # torch: only once the arguments are read
        from .resume import read_config

        output_dir = values.get("output_dir", defaults.get("output_dir", TrainConfig.output_dir))
        saved = read_config(find_checkpoint(values["resume"], output_dir))
        for name in ("resume", "overwrite", "compare"):
            saved.pop(name, None)
        values = {**saved, **values}
    return TrainConfig(**{**defaults, **values})
