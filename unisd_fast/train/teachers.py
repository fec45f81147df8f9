"""Teachers: the EMA teacher (LoRA-aware, sharded or not), frozen scorers, completion scoring.

``completion_hidden`` runs a causal LM's decoder on rows ``[prompt_i, y]`` whose prompts are
left-padded to a common length, so every row's completion occupies the same positions; it
returns the last hidden states (the lm_head input) of the completion positions only (the
state at t predicts ``y_t``). The training step never forms logits from them on its default
path: it hands them with the head weights to the fused-linear loss. ``Runner`` is the root
module every use of a model goes through, so DistributedDataParallel and FSDP2 see it
(docs/trainer.md, "Scale-out").
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import LinearHead
from .distributed import full_tensor, local_tensor


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Runner(nn.Module):
    """Root module around a causal LM (or its peft wrapper): ``runner(fn, *args)`` is
    ``fn(model, *args)`` run inside this module's forward, where DDP prepares its gradient
    reduction and FSDP2 gathers the root's parameters (embeddings, final norm, lm_head).
    ``sync_generation`` (set under FSDP with several ranks) makes every rank run the same
    number of decoding steps, as the sharded layers need all ranks in each forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.sync_generation = False

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)

    def generate(self, **kwargs):
        if self.sync_generation:
            kwargs["synced_gpus"] = True
        return self(_generate, **kwargs)


def _generate(model, **kwargs):
    return model.generate(**kwargs)


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


def lm_head(model: nn.Module) -> LinearHead:
    """The model's output head, ``z = f(h W^T + b)`` with its soft-cap and logit scale."""
    lm = _causal_lm(model)
    out = lm.get_output_embeddings()
    if not isinstance(out, nn.Linear):
        raise TypeError(f"the output head of {type(lm).__name__} is not an nn.Linear")
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return LinearHead(out.weight, out.bias, cap or None,
                      getattr(lm.config, "logit_scale", None) or None)


def completion_hidden(model, prompts, completion, mask, pad_id: int) -> torch.Tensor:
    """Last hidden states (R, T, H) of the completion positions: the lm_head input."""
    if isinstance(model, Runner):
        return model(completion_hidden, prompts, completion, mask, pad_id)
    ids, attn, positions, width = pack_rows(prompts, completion, mask, pad_id)
    body = _causal_lm(model).get_decoder()
    hidden = body(input_ids=ids, attention_mask=attn, position_ids=positions).last_hidden_state
    hidden = hidden[:, width - 1 : width - 1 + completion.shape[1]]
    return hidden if torch.is_grad_enabled() else hidden.contiguous()


def completion_forward(model, prompts, completion, mask, pad_id: int):
    """Logits (R, T, V) and last hidden states (R, T, H) of the completion positions."""
    if isinstance(model, Runner):
        return model(completion_forward, prompts, completion, mask, pad_id)
    hidden = completion_hidden(model, prompts, completion, mask, pad_id)
    return lm_head(model).logits(hidden), hidden


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
        inner = self.model.model if isinstance(self.model, Runner) else self.model
        adapters = inner.disable_adapter() if self.disable_adapter else contextlib.nullcontext()
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


def _lora_delta(module, adapter: str) -> torch.Tensor:
    """This rank's rows of a LoRA layer's ``(alpha / r) B A`` when its weights are FSDP
    shards (dim 0): B's local rows times the whole of A (r rows, gathered)."""
    if module.fan_in_fan_out:
        raise ValueError("sharded LoRA layers with fan_in_fan_out are not supported")
    a = full_tensor(module.lora_A[adapter].weight)
    b = local_tensor(module.lora_B[adapter].weight)
    return module.scaling[adapter] * (b @ a)


def iter_effective_weights(student: nn.Module):
    """(name, tensor) for each of the student's weights under the names of the plain model:
    under LoRA, each adapted layer's ``W0 + (alpha / r) B A`` (computed when reached, so only
    one merged weight exists at a time), else the parameters themselves. Weights sharded by
    FSDP2 come as this rank's local shard (rows of dim 0)."""
    lm = _causal_lm(student.model if isinstance(student, Runner) else student)
    lora_type = _lora_layer_type()
    lora_prefixes = []
    for name, module in lm.named_modules():
        if any(name.startswith(p) for p in lora_prefixes):
            continue
        prefix = f"{name}." if name else ""
        if lora_type is not None and isinstance(module, lora_type):
            lora_prefixes.append(prefix)
            base = module.get_base_layer()
            sharded = hasattr(base.weight, "to_local")
            weight = local_tensor(base.weight)
            if not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        delta = (
                            _lora_delta(module, adapter)
                            if sharded
                            else module.get_delta_weight(adapter)
                        )
                        weight = weight + delta
            yield prefix + "weight", weight
            if base.bias is not None:
                yield prefix + "bias", local_tensor(base.bias)
            continue
        for pname, param in module.named_parameters(recurse=False):
            yield prefix + pname, local_tensor(param)


def effective_weights(student: nn.Module) -> dict[str, torch.Tensor]:
    return dict(iter_effective_weights(student))


class EMATeacher:
    """A separate frozen copy whose weights follow the student every ``every`` optimizer
    steps: ``theta_T <- beta theta_T + (1 - beta) theta_S`` (fused ``_foreach_lerp_`` over
    buckets of about ``bucket_bytes``).

    ``teacher`` must be a plain copy of the student's base model (same parameter names), or a
    Runner around one; under LoRA ``theta_S`` is the student's effective weights, so the
    teacher really moves. Under FSDP2 the teacher is sharded like the student and the
    average runs shard by shard on each rank's local rows. With 16-bit teacher weights the
    average runs on a float32 master copy (``fp32_master``, default: on for 16-bit weights):
    in bfloat16 an update ``(1 - beta) (theta_S - theta_T)`` smaller than the weight's
    rounding step would be lost and the teacher would stall.
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
        self.canonical = {}
        first = {}
        for name, p in self._lm().named_parameters(remove_duplicate=False):
            self.canonical[name] = first.setdefault(id(p), name)
        self.names = list(first.values())
        if fp32_master is None:
            fp32_master = any(
                p.dtype in (torch.float16, torch.bfloat16) for p in self._lm().parameters()
            )
        self.master = None
        if fp32_master:
            params = self._local_params()
            self.master = {n: params[n].detach().float().clone() for n in self.names}

    def _lm(self) -> nn.Module:
        return self.model.model if isinstance(self.model, Runner) else self.model

    def _local_params(self) -> dict[str, torch.Tensor]:
        """Canonical name -> the parameter (its local shard when sharded), fetched afresh:
        FSDP2 may re-point a shard's storage after it was first built."""
        params = dict(self._lm().named_parameters())
        return {n: local_tensor(params[n]) for n in self.names}

    def maybe_update(self, student: nn.Module, step: int) -> bool:
        """Update after optimizer step ``step`` (1-based) when it is a multiple of ``every``."""
        if step % self.every:
            return False
        self.update(student)
        return True

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for module in (self.model, student):
            if hasattr(module, "reshard"):
                module.reshard()  # an FSDP2 root keeps its gathered weights after forward
        params = self._local_params()
        done, bucket, size = set(), [], 0
        for name, weight in iter_effective_weights(student):
            if name not in self.canonical:
                raise KeyError(f"student weight {name!r} has no counterpart in the EMA teacher")
            name = self.canonical[name]
            if name in done:
                continue
            done.add(name)
            bucket.append((name, params[name], weight.detach()))
            size += weight.numel() * weight.element_size()
            if size >= self.bucket_bytes:
                self._lerp(bucket)
                bucket, size = [], 0
        self._lerp(bucket)
        missing = [n for n in self.names if n not in done]
        if missing:
            raise KeyError(
                f"EMA teacher parameters {missing[:3]} have no counterpart in the student"
            )
        self.num_updates += 1

    def _lerp(self, bucket) -> None:
        if not bucket:
            return
        weight = 1.0 - self.beta
        params = [p for _, p, _ in bucket]
        if self.master is None:
            torch._foreach_lerp_(params, [s.to(p.dtype) for _, p, s in bucket], weight)
            return
        master = [self.master[n] for n, _, _ in bucket]
        torch._foreach_lerp_(master, [s.float() for _, _, s in bucket], weight)
        torch._foreach_copy_(params, master)

    def state_dict(self) -> dict:
        state = {"model": self._lm().state_dict(), "num_updates": self.num_updates}
        if self.master is not None:
            state["master"] = [self.master[n] for n in self.names]
        return state

    def load_state_dict(self, state: dict) -> None:
        self._lm().load_state_dict(state["model"])
        self.num_updates = state["num_updates"]
        if self.master is not None:
            for n, value in zip(self.names, state["master"], strict=True):
                self.master[n].copy_(value)
