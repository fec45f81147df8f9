"""Teachers: the EMA teacher (LoRA-aware), frozen scorers, and completion scoring.

``completion_forward`` runs a causal LM on rows ``[prompt_i, y]`` whose prompts are
left-padded to a common length, so every row's completion occupies the same positions; it
returns only the completion positions (logits at t predict ``y_t``) and their last hidden
states (the lm_head input), never the logits of the prompt.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pack_rows(prompts: list[list[int]], completion: torch.Tensor, mask: torch.Tensor, pad_id: int):
    """Left-pad ``prompts`` to a common length P and append ``completion`` (B, T) to each.

    With R = len(prompts) a multiple of B, row r gets completion row r % B (views are laid out
    view-major). Returns input ids, attention mask, position ids (R, P + T) and P.
    """
    rows, (batch, length) = len(prompts), completion.shape
    if rows % batch:
        raise ValueError(f"{rows} prompts cannot share {batch} completions")
    width = max(len(p) for p in prompts)
    device = completion.device
    ids = torch.full((rows, width + length), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((rows, width + length), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) : width] = torch.tensor(p, dtype=torch.long, device=device)
        attn[r, width - len(p) : width] = 1
    ids[:, width:] = completion.repeat(rows // batch, 1)
    attn[:, width:] = mask.long().repeat(rows // batch, 1)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, positions, width


def completion_forward(model, prompts, completion, mask, pad_id: int):
    """Logits (R, T, V) and last hidden states (R, T, H) of the completion positions."""
    ids, attn, positions, width = pack_rows(prompts, completion, mask, pad_id)
    lm = _causal_lm(model)
    body = lm.get_decoder()
    hidden = body(input_ids=ids, attention_mask=attn, position_ids=positions).last_hidden_state
    hidden = hidden[:, width - 1 : width - 1 + completion.shape[1]]
    logits = lm.get_output_embeddings()(hidden)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    scale = getattr(lm.config, "logit_scale", None)
    if scale:
        logits = logits * scale
    return logits, hidden


class Scorer:
    """A frozen model used without gradient, in eval mode: a separate module, or the student
    with its LoRA adapters disabled (the base model, at no extra memory)."""

    def __init__(self, model: nn.Module, disable_adapter: bool = False):
        self.model = model
        self.disable_adapter = disable_adapter

    @contextlib.contextmanager
    def active(self):
        was_training = self.model.training
        self.model.eval()
        adapters = (
            self.model.disable_adapter() if self.disable_adapter else contextlib.nullcontext()
        )
        try:
            with torch.no_grad(), adapters:
                yield self.model
        finally:
            self.model.train(was_training)


def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def iter_effective_weights(student: nn.Module):
    """(name, tensor) for each of the student's weights under the names of the plain model:
    under LoRA, each adapted layer's ``W0 + (alpha / r) B A`` (computed when reached, so only
    one merged weight exists at a time), else the parameters themselves."""
    lm = _causal_lm(student)
    lora_type = _lora_layer_type()
    lora_prefixes = []
    for name, module in lm.named_modules():
        if any(name.startswith(p) for p in lora_prefixes):
            continue
        prefix = f"{name}." if name else ""
        if lora_type is not None and isinstance(module, lora_type):
            lora_prefixes.append(prefix)
            base = module.get_base_layer()
            weight = base.weight
            if not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter)
            yield prefix + "weight", weight
            if base.bias is not None:
                yield prefix + "bias", base.bias
            continue
        for pname, param in module.named_parameters(recurse=False):
            yield prefix + pname, param


def effective_weights(student: nn.Module) -> dict[str, torch.Tensor]:
    return dict(iter_effective_weights(student))


class EMATeacher:
    """A separate frozen copy whose weights follow the student every ``every`` optimizer
    steps: ``theta_T <- beta theta_T + (1 - beta) theta_S`` (fused ``_foreach_lerp_`` over
    buckets of about ``bucket_bytes``).

    ``teacher`` must be a plain copy of the student's base model (same parameter names);
    under LoRA ``theta_S`` is the student's effective weights, so the teacher really moves.
    With 16-bit teacher weights the average runs on a float32 master copy (``fp32_master``,
    default: on for 16-bit weights): in bfloat16 an update ``(1 - beta) (theta_S - theta_T)``
    smaller than the weight's rounding step would be lost and the teacher would stall.
    """

    def __init__(
        self,
        teacher: nn.Module,
        beta: float,
        every: int,
        fp32_master: bool | None = None,
        bucket_bytes: int = 2**28,
    ):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ema_beta must lie in [0, 1), got {beta}")
        if every < 1:
            raise ValueError(f"ema_every must be >= 1, got {every}")
        self.model = teacher.eval().requires_grad_(False)
        self.beta, self.every, self.bucket_bytes = beta, every, bucket_bytes
        self.num_updates = 0
        self.params = dict(self.model.named_parameters(remove_duplicate=False))
        if fp32_master is None:
            fp32_master = any(
                p.dtype in (torch.float16, torch.bfloat16) for p in self.params.values()
            )
        self.master = None
        if fp32_master:
            self.master = {id(p): p.detach().float().clone() for p in self.params.values()}

    def maybe_update(self, student: nn.Module, step: int) -> bool:
        """Update after optimizer step ``step`` (1-based) when it is a multiple of ``every``."""
        if step % self.every:
            return False
        self.update(student)
        return True

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        done, bucket, size = set(), [], 0
        for name, weight in iter_effective_weights(student):
            if name not in self.params:
                raise KeyError(f"student weight {name!r} has no counterpart in the EMA teacher")
            param = self.params[name]
            if id(param) in done:
                continue
            done.add(id(param))
            bucket.append((param, weight.detach()))
            size += weight.numel() * weight.element_size()
            if size >= self.bucket_bytes:
                self._lerp(bucket)
                bucket, size = [], 0
        self._lerp(bucket)
        missing = [n for n, p in self.params.items() if id(p) not in done]
        if missing:
            raise KeyError(
                f"EMA teacher parameters {missing[:3]} have no counterpart in the student"
            )
        self.num_updates += 1

    def _lerp(self, bucket) -> None:
        if not bucket:
            return
        weight = 1.0 - self.beta
        params = [p.data for p, _ in bucket]
        if self.master is None:
            torch._foreach_lerp_(params, [s.to(p.dtype) for p, s in bucket], weight)
            return
        master = [self.master[id(p)] for p, _ in bucket]
        torch._foreach_lerp_(master, [s.float() for _, s in bucket], weight)
        torch._foreach_copy_(params, master)

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "num_updates": self.num_updates}
        if self.master is not None:
            state["master"] = [self.master[id(p)] for p in self._unique()]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]
        if self.master is not None:
            for p, value in zip(self._unique(), state["master"], strict=True):
                self.master[id(p)].copy_(value)

    def _unique(self) -> list:
        seen, unique = set(), []
        for p in self.params.values():
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        return unique
