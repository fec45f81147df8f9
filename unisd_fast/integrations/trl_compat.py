"""Every use of TRL's private API by the TRL integration, in one place (docs/trl.md).

The integration needs what SDFTTrainer has no public hook for: adding keys to the rollout
batch, building teacher prompts for other contexts, the pad id, routing a forward to the
teacher's weights, recording metrics, and SDFT's loss-token mask. They are wrapped here as
public methods of ``SDFTBridge``; the trainer in ``trl.py`` touches nothing private of
TRL's. A TRL release outside ``SUPPORTED_TRL`` may rename them: then only this file needs
to change.
"""

from __future__ import annotations

import warnings

import torch
import trl
from packaging.version import Version
from trl.experimental.sdft import SDFTTrainer

SUPPORTED_TRL = (Version("1.16"), Version("1.17"))

if not SUPPORTED_TRL[0] <= Version(trl.__version__) < SUPPORTED_TRL[1]:
    warnings.warn(
        f"unisd_fast.integrations.trl supports trl>={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]}; "
        f"found trl {trl.__version__}, whose private SDFTTrainer API may differ",
        stacklevel=2,
    )


class SDFTBridge(SDFTTrainer):
    """SDFTTrainer with its private hooks exposed under stable names."""

    _tag_names = ["trl", "sdft", "unisd"]
    _name = "UniSD SDFT"

    def _prepare_training_batch(self, inputs):
        batch = super()._prepare_training_batch(inputs)
        return self.extend_batch(batch, inputs)

    def extend_batch(self, batch: dict, inputs: list[dict]) -> dict:
        """Add keys to the rollout batch of ``inputs`` (the dataset rows). Called once per
        generation batch, before TRL splits it into per-step slices along dim 0."""
        return batch

    @property
    def pad_token_id(self) -> int:
        return self._tokenizer.pad_token_id

    def build_teacher_inputs(self, prompts, contexts, completion_ids, completion_mask):
        """(ids, mask) of ``teacher_prompt_template`` filled with each prompt and context,
        tokenised and left-padded as TRL does for its teacher, then the completion."""
        built = self.teacher_context_builder.build(
            prompts, contexts, completion_ids, completion_mask
        )
        return built["teacher_input_ids"], built["teacher_attention_mask"]

    def teacher_context(self):
        """The context manager under which a forward of ``self.teacher_model`` runs with the
        teacher's weights (disables or switches PEFT adapters for the base / EMA kinds)."""
        return self._get_teacher_context_for_self_distillation()

    def teacher_server_logprobs(self, inputs, length: int) -> dict:
        """The teacher's log-probs from the vLLM server over the last ``length`` positions:
        ``topk_token_ids`` and ``topk_logprobs`` (B, T, distillation_topk) and
        ``actual_logprobs`` (B, T, the completion tokens'); the server's weights synced
        first when the step moved on, as SDFT does."""
        if self.state.global_step != self._last_loaded_step:
            self.vllm_generation.sync_weights()
            self.accelerator.wait_for_everyone()
            self._last_loaded_step = self.state.global_step
        return self._get_teacher_token_logprobs_from_server(inputs, length)

    def loss_mask(self, completion_mask: torch.Tensor) -> torch.Tensor:
        """SDFT's loss mask: the completion mask without its first
        ``num_loss_tokens_to_skip`` positions."""
        skip = self.num_loss_tokens_to_skip
        if skip <= 0:
            return completion_mask
        positions = torch.arange(completion_mask.size(1), device=completion_mask.device)
        return completion_mask * (positions >= skip).unsqueeze(0).to(completion_mask.dtype)

    def record_metrics(self, mode: str, distillation_loss: float, extra: dict[str, float]):
        """Log the distillation loss under TRL's SDFT metric names, and ``extra`` as is."""
        self._log_self_distillation_metric(mode, distillation_loss)
        for name, value in extra.items():
            self._metrics[mode][name].append(value)
