"""TrainConfig: every option of ``unisd-train``, its command line and its config files.

Flags are generated from the fields (``lora_r`` -> ``--lora-r``); ``--config file.yaml|json``
supplies field values that explicit flags override. Loss options left at None take the
method's defaults (``--method``); setting one switches that mechanism on or off by itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import AGREEMENTS, DIVERGENCES, NORMALIZATIONS, PRESETS, UniSDConfig
from .checkpoint import find_checkpoint, read_checkpoint_config
from .tasks import builtin_defaults

METHODS = ("sft", "ema", *PRESETS)
EMA_DEFAULTS = {"ema": (0.9, 10), "unisd_star": (0.98, 10)}
LOSS_FIELDS = (
    "divergence",
    "jsd_alpha",
    "temperature",
    "clip",
    "clip_quantile",
    "agreement",
    "agreement_gamma",
    "view_temperature",
    "contrastive_weight",
    "contrastive_margin",
    "feature_weight",
    "kd_weight",
    "normalize",
)

METHOD_DEFAULTED = (*LOSS_FIELDS, "ema_beta", "ema_every")


def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
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
        "builtin", "JSONL file (prompt, demonstration[, negative, answer]) or builtin[:NAME]"
    )
    eval_data: str | None = _f(None, "held-out JSONL; default: hold out --eval-size examples")
    eval_size: int = _f(16, "examples held out of --data for evaluation when no --eval-data")
    max_prompt_tokens: int = _f(
        3072, "drop examples whose teacher/negative prompt is longer; views are left-truncated"
    )
    max_new_tokens: int = _f(32, "completion length, in training and evaluation")
    chat_template: bool = _f(True, "wrap prompts in the tokenizer's chat template when it has one")
    # method and loss
    method: str = _f("unisd_star", "training method", choices=METHODS)
    divergence: str | None = _f(None, "divergence (method default)", choices=DIVERGENCES)
    jsd_alpha: float | None = _f(None, "JSD alpha (with --divergence jsd)")
    temperature: float | None = _f(None, "logit temperature tau of the loss (default 0.7)")
    clip: float | None = _f(None, "clip the per-token divergence at this value")
    clip_quantile: float | None = _f(None, "clip the divergence at this batch quantile")
    agreement: str | None = _f(
        None,
        "multi-teacher agreement weighting; bare --agreement = token",
        choices=AGREEMENTS,
        const="token",
    )
    agreement_gamma: float | None = _f(None, "agreement gamma")
    view_temperature: float | None = _f(None, "temperature of the view log-probs (default 1)")
    num_views: int = _f(3, "number of teacher views K (with agreement)")
    contrastive_weight: float | None = _f(None, "weight of the contrastive hinge (0 = off)")
    contrastive_margin: float | None = _f(None, "margin of the contrastive hinge")
    feature_weight: float | None = _f(None, "weight of hidden-state feature matching (0 = off)")
    kd_weight: float | None = _f(None, "weight of the divergence term")
    normalize: str | None = _f(None, "loss normalisation", choices=NORMALIZATIONS)
    ema_beta: float | None = _f(None, "EMA teacher beta; 0 = no EMA (ema: 0.9, unisd_star: 0.98)")
    ema_every: int | None = _f(None, "EMA update every n optimizer steps (default 10)")
    loss_impl: str = _f(
        "auto", "unisd_loss implementation", choices=("auto", "torch", "triton", "reference")
    )
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
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and float in _types(hints[f.name])
            ):
                value = float(value)
                setattr(self, f.name, value)
            _check_type(f.name, value, hints[f.name])
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
        if self.ema_beta is not None and not 0 <= self.ema_beta < 1:
            raise ConfigError(f"ema_beta must lie in [0, 1), got {self.ema_beta}")
        if self.ema_every is not None and self.ema_every < 1:
            raise ConfigError(f"ema_every must be >= 1, got {self.ema_every}")
        for name in (self.compare or "").split(","):
            if self.compare is not None and name.strip() not in METHODS:
                raise ConfigError(f"compare: {name.strip()!r} is not a method of {METHODS}")
        if self.method != "sft":
            try:
                self.loss_config()
            except (TypeError, ValueError) as e:
                raise ConfigError(str(e).replace("UniSDConfig.", "")) from None

    def loss_config(self) -> UniSDConfig:
        """The method's UniSDConfig preset with every loss field that is set overriding it."""
        preset = "sd" if self.method in ("sft", "ema") else self.method
        overrides = {n: getattr(self, n) for n in LOSS_FIELDS if getattr(self, n) is not None}
        return UniSDConfig.preset(preset, **overrides)

    def ema_settings(self) -> tuple[float, int] | None:
        """(beta, every) of the EMA teacher, or None when the teacher is frozen."""
        beta, every = EMA_DEFAULTS.get(self.method, (0.0, 10))
        beta = beta if self.ema_beta is None else self.ema_beta
        every = every if self.ema_every is None else self.ema_every
        return (beta, every) if beta > 0 and self.method != "sft" else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the field."""


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unisd-train",
        description="UniSD on-policy self-distillation of a causal LM (and its baselines).",
        epilog="The default run (--data builtin --model tiny) is the built-in facts task "
        "(unisd_fast.facts): it pre-trains the tiny model once, then trains with these values "
        "in place of the defaults above: "
        + ", ".join(f"{k}={v}" for k, v in builtin_defaults("builtin:facts", "tiny").items()),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON file of field values; flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        allowed = _types(hints[f.name])
        kind = next(t for t in allowed if t is not type(None))
        meta = f.metadata
        default = "the method's" if f.name in METHOD_DEFAULTED else f.default
        help_text = f"{meta['help']} (default: {default})"
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


def parse_args(argv=None) -> TrainConfig:
    """TrainConfig from the command line: defaults < the builtin task's defaults (facts on the
    tiny model, :func:`unisd_fast.data.builtin_defaults`) < the resumed checkpoint's config <
    ``--config`` file < explicit flags."""
    args = vars(build_parser().parse_args(argv))
    values = load_config_file(args.pop("config")) if "config" in args else {}
    values.update(args)
    task = values.get("data", TrainConfig.data), values.get("model", TrainConfig.model)
    defaults = builtin_defaults(*task)
    if values.get("resume"):
        output_dir = values.get("output_dir", defaults.get("output_dir", TrainConfig.output_dir))
        saved = read_checkpoint_config(find_checkpoint(values["resume"], output_dir))
        values = {**saved, **values}
    return TrainConfig(**{**defaults, **values})
