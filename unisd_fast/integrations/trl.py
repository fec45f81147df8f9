"""UniSD inside TRL: ``UniSDSDFTTrainer``, TRL's SDFTTrainer with the UniSD loss (docs/trl.md).

Rollouts (transformers or vLLM), teacher kinds (base / live / EMA, PEFT adapters),
accelerate, logging and checkpoints stay TRL's. This module replaces only the loss: it adds
the agreement views and the negative context to TRL's rollout batch, and computes the loss
with ``unisd_fast.unisd_linear_loss`` on last hidden states and the output layer (no logits
materialised), or ``unisd_fast.unisd_loss`` on the model's logits where the fused-linear
form does not apply. Needs ``pip install unisd-fast[trl]``.
"""

from __future__ import annotations

import random

import torch
from accelerate.logging import get_logger

from .. import LinearHead, label_logprobs, select_view_rows, unisd_linear_loss, unisd_loss
from .trl_batch import other_contexts, stack_left_padded, step_token_counts
from .trl_compat import SUPPORTED_TRL, SDFTBridge
from .trl_config import UniSDSDFTConfig, divergence_of_alpha
from .trl_head import compute_dtype, head_mismatch, output_head

__all__ = ["SUPPORTED_TRL", "UniSDSDFTConfig", "UniSDSDFTTrainer", "divergence_of_alpha"]

logger = get_logger(__name__)

METRICS = (
    "unisd/kd",
    "unisd/contrastive",
    "unisd/feature",
    "unisd/clipped_fraction",
    "unisd/agreement_weight",
)


def given_support(extra: dict) -> dict:
    """The given sparse support's arguments of the loss among ``extra`` (none without)."""
    return {k: extra[k] for k in ("teacher_indices", "teacher_logprobs") if k in extra}


class UniSDSDFTTrainer(SDFTBridge):
    """SDFTTrainer whose loss is the UniSD loss of ``args.unisd_loss_config()``.

    Takes SDFTTrainer's arguments; ``args`` must be a UniSDSDFTConfig. The dataset needs
    ``prompt`` and ``privileged_context`` columns as for SDFT, and with a contrastive weight
    also the ``args.unisd_negative_column`` column.
    """

    config_cls = UniSDSDFTConfig

    def __init__(
        self,
        model,
        args: UniSDSDFTConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        if not isinstance(args, UniSDSDFTConfig):
            raise TypeError(f"args must be a UniSDSDFTConfig, got {type(args).__name__}")
        self.unisd_config = args.unisd_loss_config()
        self._check_columns(args, train_dataset, eval_dataset)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        self.unisd_path: str | None = None  # "linear" or "logits", chosen on the first batch

    def _check_columns(self, args, train_dataset, eval_dataset):
        needed = []
        if self.unisd_config.needs_negative:
            needed.append(args.unisd_negative_column)
        if self.unisd_config.needs_views:
            needed.extend(["prompt", "privileged_context"])
        evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        for name, data in [("train_dataset", train_dataset)] + [("eval_dataset", d) for d in evals]:
            columns = getattr(data, "column_names", None)
            missing = [c for c in needed if columns is not None and c not in columns]
            if missing:
                raise ValueError(
                    f"{name} lacks the column(s) {missing} that the UniSD config needs "
                    f"(contrastive: args.unisd_negative_column; agreement: prompt and "
                    f"privileged_context)"
                )

    def extend_batch(self, batch: dict, inputs: list[dict]) -> dict:
        """Add the teacher inputs of the K agreement views, of the negative context, and
        with token normalisation the loss-token count of each row's optimizer step."""
        cfg = self.unisd_config
        prompts = [example["prompt"] for example in inputs]
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        training = self.model.training
        if cfg.needs_views:
            seed = f"unisd-views:{self.args.seed}:{self.args.process_index}:"
            rng = random.Random(seed + f"{self.state.global_step}:{training}")
            contexts = other_contexts(self.train_dataset, prompts, self.args.unisd_num_views, rng)
            pieces = [
                self.build_teacher_inputs(
                    prompts, [row[k] for row in contexts], completion_ids, completion_mask
                )
                for k in range(self.args.unisd_num_views)
            ]
            ids, mask = stack_left_padded(pieces, self.pad_token_id)
            batch["unisd_view_input_ids"], batch["unisd_view_attention_mask"] = ids, mask
        if cfg.needs_negative:
            negatives = [example[self.args.unisd_negative_column] for example in inputs]
            ids, mask = self.build_teacher_inputs(
                prompts, negatives, completion_ids, completion_mask
            )
            batch["unisd_negative_input_ids"], batch["unisd_negative_attention_mask"] = ids, mask
        if cfg.normalize == "token" and training:
            batch["unisd_num_items"] = step_token_counts(
                self.loss_mask(completion_mask),
                self.args.steps_per_generation,
                self.args.gradient_accumulation_steps,
                self.accelerator.gather,
            )
        return batch

    def _forward(self, model, input_ids, attention_mask, length: int, logits: bool, hidden: bool):
        """Model outputs at the positions predicting the last ``length`` tokens: the logits
        (B, T, V) when ``logits`` (else only the last position's are computed, where the model
        allows), the last hidden states (B, T, H) when ``hidden``; and the raw output."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if "logits_to_keep" in self.model_kwarg_keys:
            kwargs["logits_to_keep"] = length + 1 if logits else 1
        if hidden:
            kwargs["output_hidden_states"] = True
        out = model(**kwargs)
        kept = out.logits[:, :-1][:, -length:] if logits else None
        states = out.hidden_states[-1][:, -length - 1 : -1] if hidden else None
        return kept, states, out

    def _items(self, inputs, num_items_in_batch, training: bool):
        """The token count of ``normalize="token"`` and the factor that undoes the
        cross-process gradient average (None, 1 when the loss is a batch mean)."""
        if self.unisd_config.normalize != "token" or not training:
            return None, 1
        if num_items_in_batch is not None:
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            return num_items_in_batch, scale
        return inputs["unisd_num_items"][0], self.accelerator.num_processes

    def _head(self, model) -> LinearHead | str:
        """The model's output layer (in the dtype its GEMM runs in), or why it has none."""
        head = output_head(self.accelerator.unwrap_model(model))
        if isinstance(head, str):
            return head
        return head.to(compute_dtype(head.weight, self.accelerator.mixed_precision))

    def _heads(self, model) -> tuple[LinearHead, LinearHead]:
        """Student and teacher heads; one object when they share their weight and bias, so
        that the loss sees the very same tensors (one GEMM for both)."""
        raw = [output_head(self.accelerator.unwrap_model(m)) for m in (model, self.teacher_model)]
        student = self._head(model)
        if raw[1].weight is raw[0].weight and raw[1].bias is raw[0].bias:
            return student, student
        return student, self._head(self.teacher_model)

    def _linear_blocker(self, model, input_ids, attention_mask) -> str | None:
        """Why the fused-linear path cannot compute this model's loss, or None."""
        if self.is_fsdp_enabled:
            return "FSDP shards the output layer's weight"
        plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
        if plugin is not None and plugin.zero_stage == 3:
            return "DeepSpeed ZeRO-3 shards the output layer's weight"
        for name, candidate in (("the student", model), ("the teacher", self.teacher_model)):
            head = self._head(candidate)
            if isinstance(head, str):
                return f"{name}: {head}"
        with torch.no_grad():
            _, _, out = self._forward(model, input_ids[:1], attention_mask[:1], 1, False, True)
        return head_mismatch(
            self._head(model), out.hidden_states[-1][:, -1], out.logits[:, -1]
        )

    def _loss_path(self, model, input_ids, attention_mask) -> str:
        """``args.unisd_loss_path`` resolved on the first batch: "linear" or "logits"."""
        if self.unisd_path is None:
            wanted = self.args.unisd_loss_path
            reason = None
            if wanted != "logits":
                reason = self._linear_blocker(model, input_ids, attention_mask)
            if reason is not None and wanted == "linear":
                raise ValueError(f"unisd_loss_path='linear' does not apply to this model: {reason}")
            if reason is not None:
                logger.warning(f"UniSD loss on the logits path: {reason}")
            self.unisd_path = "logits" if wanted == "logits" or reason else "linear"
        return self.unisd_path

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("UniSDSDFTTrainer does not support returning outputs")
        completion_ids = inputs["completion_ids"]
        loss_mask = self.loss_mask(inputs["completion_mask"])
        labels = completion_ids.masked_fill(loss_mask == 0, self.unisd_config.ignore_index)
        student_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        student_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        items, scale = self._items(inputs, num_items_in_batch, model.training)
        step = self._linear_loss
        if self._loss_path(model, student_ids, student_mask) == "logits":
            step = self._logits_loss
        extra = self._support(inputs, labels) if self.use_teacher_server else {}
        cfg = self.unisd_config
        old = inputs.get("old_per_token_logps")
        if self.args.distillation_is_clip is not None and old is not None:
            cfg = cfg.replace(importance_clip=self.args.distillation_is_clip)
            extra["old_logprobs"] = old
        out = step(model, inputs, labels, student_ids, student_mask, items, cfg, extra)
        self._log_unisd(model.training, out, loss_mask)
        loss = out.loss
        if not model.training:
            return loss
        if items is not None:
            return loss * scale
        return loss / self.current_gradient_accumulation_steps

    def _adaptive(self) -> bool:
        cfg = self.unisd_config
        return cfg.needs_views and cfg.agreement_coverage < 1.0

    def _plain_config(self):
        """The loss config whose only term is the unweighted divergence: its per-token
        values choose the rows the views score (adaptive agreement)."""
        return self.unisd_config.replace(
            agreement="none", agreement_coverage=1.0, clip=None, clip_quantile=None,
            contrastive_weight=0.0, feature_weight=0.0, kd_weight=1.0)

    def _selected_views(self, inputs, labels, divergence, teacher_hidden):
        """Adaptive agreement (docs/losses.md): the K views scored on the rows holding
        ``agreement_coverage`` of the divergence mass, truncated after their last
        completion position; every process selects as many rows as the one with most, so
        all run the same forwards. Returns the loss's view inputs and ``view_mask``: view
        hidden states (K, B, T, H) when ``teacher_hidden`` is given, else label log-probs
        (K, B, T) (zero where not scored)."""
        cfg, teacher = self.unisd_config, self.teacher_model
        mask = labels != cfg.ignore_index
        sel = select_view_rows(divergence, mask, cfg.agreement_coverage, cfg.normalize)
        count = torch.tensor([len(sel.rows)], device=labels.device)
        agreed = int(self.accelerator.gather(count).max())
        if agreed > len(sel.rows):
            sel = select_view_rows(divergence, mask, cfg.agreement_coverage, cfg.normalize,
                                   at_least=agreed)
        ids, attn = inputs["unisd_view_input_ids"], inputs["unisd_view_attention_mask"]
        (B, K, L), T, n = ids.shape, labels.size(1), max(sel.length, 1)
        ids = ids[sel.rows, :, : L - T + n].transpose(0, 1)
        attn = attn[sel.rows, :, : L - T + n].transpose(0, 1)
        rows = len(sel.rows)
        if teacher_hidden is None:
            views = torch.zeros(K, B, T, dtype=torch.float32, device=labels.device)
            for k in range(K if rows else 0):
                out = self._forward(teacher, ids[k], attn[k], n, True, False)[0]
                views[k, sel.rows, :n] = self._label_logprobs(
                    out, labels[sel.rows, :n], cfg.view_temperature)
            return {"view_logprobs": views, "view_mask": sel.view_mask}
        views = teacher_hidden.new_zeros(K, B, T, teacher_hidden.size(-1))
        if rows:
            hidden = self._forward(teacher, ids.flatten(0, 1), attn.flatten(0, 1), n, False,
                                   True)[1]
            views[:, sel.rows, :n] = hidden.unflatten(0, (K, rows)).to(views.dtype)
        return {"view_hidden": views, "view_mask": sel.view_mask}
    def _support(self, inputs, labels) -> dict:
        """The teacher's top-k from the server as the loss's given support (and its label
        log-probs, for the contrastive term)."""
        teacher = self.teacher_server_logprobs(inputs, labels.size(1))
        support = {"teacher_indices": teacher["topk_token_ids"],
                   "teacher_logprobs": teacher["topk_logprobs"]}
        if self.unisd_config.needs_negative:
            kept = labels != self.unisd_config.ignore_index
            actual = teacher["actual_logprobs"]
            support["teacher_label_logprobs"] = torch.where(kept, actual, torch.zeros_like(actual))
        return support

    def _views_and_negative(self, inputs, length: int, logits: bool):
        """The teacher's outputs on the K views, (K, B, T, ...), and on the negative,
        (B, T, ...): logits when ``logits`` else last hidden states; None where the config
        needs none (or the views are chosen adaptively). Run under no_grad and the teacher
        context."""
        cfg, teacher = self.unisd_config, self.teacher_model
        views = negative = None
        if cfg.needs_views and not self._adaptive():
            ids, mask = inputs["unisd_view_input_ids"], inputs["unisd_view_attention_mask"]
            if logits:  # one view at a time: each holds B x T x V logits
                views = [
                    self._forward(teacher, i, m, length, True, False)[0]
                    for i, m in zip(ids.unbind(1), mask.unbind(1), strict=True)
                ]
            else:  # the K views batched: (K * B, L), view-major
                flat_ids = ids.transpose(0, 1).flatten(0, 1)
                flat_mask = mask.transpose(0, 1).flatten(0, 1)
                hidden = self._forward(teacher, flat_ids, flat_mask, length, False, True)[1]
                views = hidden.unflatten(0, (ids.size(1), ids.size(0)))
        if cfg.needs_negative:
            ids = inputs["unisd_negative_input_ids"]
            mask = inputs["unisd_negative_attention_mask"]
            negative = self._forward(teacher, ids, mask, length, logits, not logits)[
                0 if logits else 1
            ]
        return views, negative

    def _teacher(self, inputs, length: int, logits: bool, given: bool):
        """The teacher's logits (unless ``given``: a server support) and last hidden states
        (with feature matching, or on the linear path without a given support)."""
        cfg = self.unisd_config
        hidden = cfg.needs_hidden or not (logits or given)
        if given and not hidden:
            return None, None
        teacher_logits, teacher_hidden, _ = self._forward(
            self.teacher_model,
            inputs["teacher_input_ids"],
            inputs["teacher_attention_mask"],
            length,
            logits and not given,
            hidden,
        )
        return teacher_logits, teacher_hidden

    def _logits_loss(self, model, inputs, labels, student_ids, student_mask, items, cfg, extra):
        """unisd_loss on the model's logits; views and negative as label log-probs."""
        length = labels.size(1)
        student_logits, student_hidden, _ = self._forward(
            model, student_ids, student_mask, length, True, cfg.needs_hidden
        )
        extra = dict(extra)
        with torch.no_grad(), self.teacher_context():
            teacher_logits, teacher_hidden = self._teacher(
                inputs, length, True, "teacher_indices" in extra
            )
            views, negative = self._views_and_negative(inputs, length, logits=True)
            if self._adaptive():
                divergence = unisd_loss(
                    student_logits.detach(), teacher_logits, labels,
                    config=self._plain_config(), num_items_in_batch=items,
                    impl=self.args.unisd_impl, **given_support(extra)).token_divergence
                extra.update(self._selected_views(inputs, labels, divergence, None))
            if views is not None:
                extra["view_logprobs"] = torch.stack(
                    [self._label_logprobs(v, labels, cfg.view_temperature) for v in views]
                )
            if negative is not None:
                extra["negative_logprobs"] = self._label_logprobs(
                    negative, labels, cfg.temperature
                )
        return unisd_loss(
            student_logits,
            teacher_logits,
            labels,
            student_hidden=student_hidden,
            teacher_hidden=teacher_hidden,
            config=cfg,
            num_items_in_batch=items,
            impl=self.args.unisd_impl,
            **extra,
        )

    def _label_logprobs(self, logits, labels, temperature: float):
        """log softmax(logits / temperature)[label] (B, T): the label pass of the loss's
        implementation, no (B, T, V) temporary."""
        cfg = self.unisd_config
        return label_logprobs(logits, labels, temperature, ignore_index=cfg.ignore_index,
                              impl=self.args.unisd_impl)

    def _linear_loss(self, model, inputs, labels, student_ids, student_mask, items, cfg, extra):
        """unisd_linear_loss on last hidden states and the output layers: no logits."""
        length = labels.size(1)
        _, student_hidden, _ = self._forward(model, student_ids, student_mask, length, False, True)
        student, teacher = self._heads(model)
        given = "teacher_indices" in extra
        with torch.no_grad(), self.teacher_context():
            _, teacher_hidden = self._teacher(inputs, length, False, given)
            views, negative = self._views_and_negative(inputs, length, logits=False)
        # Hidden states in their head's dtype (under autocast they may differ from it).
        as_teacher = lambda h: None if h is None else h.to(teacher.weight.dtype)
        hs, ht = student_hidden.to(student.weight.dtype), as_teacher(teacher_hidden)
        extra = {**extra, "view_hidden": as_teacher(views)}
        if self._adaptive():
            with torch.no_grad():
                divergence = unisd_linear_loss(
                    hs.detach(), student.weight, ht, None if given else teacher.weight, labels,
                    config=self._plain_config(), student_bias=student.bias,
                    teacher_bias=None if given else teacher.bias,
                    logit_softcap=student.softcap, logit_scale=student.scale,
                    num_items_in_batch=items, impl=self.args.unisd_impl,
                    **given_support(extra)).token_divergence
                with self.teacher_context():
                    extra.update(self._selected_views(inputs, labels, divergence, ht))
        # a given support uses the teacher head only to score hidden-state views or negative
        head_used = not given or extra["view_hidden"] is not None or negative is not None
        return unisd_linear_loss(
            hs, student.weight, ht, teacher.weight if head_used else None, labels,
            student_bias=student.bias, teacher_bias=teacher.bias if head_used else None,
            negative_hidden=as_teacher(negative), logit_softcap=student.softcap,
            logit_scale=student.scale, config=cfg, num_items_in_batch=items,
            impl=self.args.unisd_impl, **extra)

    def _log_unisd(self, training: bool, out, loss_mask):
        tokens = loss_mask.sum().clamp(min=1).to(torch.float32)
        values = torch.stack(
            [
                out.kd.float(),
                out.contrastive.float(),
                out.feature.float(),
                out.clipped.sum().float() / tokens,
                out.token_weight.sum().float() / tokens,
            ]
        )
        values = self.accelerator.gather(values.unsqueeze(0)).mean(dim=0).tolist()
        metrics = dict(zip(METRICS, values, strict=True))
        self.record_metrics("train" if training else "eval", metrics["unisd/kd"], metrics)
