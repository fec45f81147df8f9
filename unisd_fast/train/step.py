"""The gradient of one optimizer step, accumulated over micro-batches and ranks.

Normalisation is exact (docs/trainer.md, "Exact normalisation across micro-batches and
ranks"): all completions of the step are sampled first, their tokens and sequences are
counted and summed over ranks, and every micro-batch's loss is its share of the global loss:
with ``normalize="token"`` the loss gets ``num_items_in_batch`` = the step's completion tokens
over all micro-batches and ranks; with ``"sequence"`` the micro-batch's mean over its
sequences is scaled by ``B_micro / B_global``. Data-parallel gradient averaging divides by
the number of data-parallel ranks W (ranks over WORLD_SIZE / --tensor-parallel groups that
share their data), so the backpropagated loss is that share times W. The sum of the
shares is the loss of the whole global batch; that is what the metrics report.

The distillation forwards return lm_head inputs only; ``loss_path="linear"`` hands them with
the head weights to ``unisd_linear_loss`` (no logits tensor in the step), ``"logits"``
applies the heads and calls ``unisd_loss`` (kept to measure the two side by side).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import LinearHead
from .distributed import Parallel, all_reduce_max, all_reduce_sum, gradient_sync, unwrap
from .phases import PhaseTimer, phase
from .rollout import generate, right_pad
from .teachers import Runner, Scorer, completion_hidden, lm_head
from .tensor_parallel import vocab_shards


@dataclass
class Micro:
    """One micro-batch: its positions in the data stream, items and completions (B, T)."""

    positions: list[int]
    items: list
    completion: torch.Tensor
    mask: torch.Tensor


@dataclass
class StepSetup:
    """What the step needs besides the run's Context: the student's (wrapped) runner, the
    teacher scorer, the loss config (None for SFT) and the process's place."""

    runner: torch.nn.Module
    teacher: Scorer | None
    loss_cfg: object
    par: Parallel
    loss_path: str = "linear"
    sampler: object = None
    views: object = None
    timer: PhaseTimer | None = None


def sample(ctx, setup: StepSetup, positions: list[int], items: list) -> Micro:
    """Completions of the micro-batch: sampled from the student, or the sampler's (a
    callable ``(positions, items) -> list of token lists``, used to fix them in tests)."""
    if setup.sampler is not None:
        y, mask = right_pad(setup.sampler(positions, items), ctx.pad_id, ctx.device)
        return Micro(positions, items, y, mask)
    if setup.loss_cfg is None:
        y, mask = right_pad([it.gold for it in items], ctx.pad_id, ctx.device)
        return Micro(positions, items, y, mask)
    with Scorer(unwrap(setup.runner)).active() as model, phase(setup.timer, "sampling"):
        y, mask = generate(model, [it.student for it in items], ctx.sampling, ctx.device)
    return Micro(positions, items, y, mask)


def _teacher_scores(ctx, setup: StepSetup, micro: Micro, labels):
    """Teacher hidden states, views and negative (as hidden states on the linear path, as
    logits on the logits path) and the teacher head (None: the student's own head)."""
    cfg, loss_cfg = ctx.cfg, setup.loss_cfg
    y, mask, items = micro.completion, micro.mask, micro.items
    shared = setup.teacher.model is unwrap(setup.runner)
    linear = setup.loss_path == "linear"

    def score(model):
        head = lm_head(model)
        prompts = [it.teacher for it in items]
        with phase(setup.timer, "teacher"):
            out = {"hidden": completion_hidden(model, prompts, y, mask, ctx.pad_id)}
        if loss_cfg.needs_views and not adaptive(loss_cfg):
            with phase(setup.timer, "views"):
                rows = setup.views(micro.positions)
                v = completion_hidden(model, rows, y, mask, ctx.pad_id)
            out["views"] = v.view(cfg.num_views, len(items), *v.shape[1:])
        if loss_cfg.needs_negative:
            negatives = [it.negative for it in items]
            with phase(setup.timer, "negative"):
                out["negative"] = completion_hidden(model, negatives, y, mask, ctx.pad_id)
        if not linear:
            out["logits"] = head.logits(out["hidden"])
            for key in ("views", "negative"):
                if key in out:
                    out[key] = head.logits(out[key])
        if linear and not shared:
            out["head"] = head.detached() if setup.par.mode == "fsdp" else head
        return out

    with setup.teacher.active() as model:
        return model(score) if isinstance(model, Runner) else score(model)


def adaptive(loss_cfg) -> bool:
    """Adaptive agreement: the views score only the sequences holding the config's
    ``agreement_coverage`` of the divergence mass (docs/losses.md, "Adaptive agreement")."""
    return loss_cfg.needs_views and loss_cfg.agreement_coverage < 1.0


def _divergence(ctx, setup: StepSetup, labels, hidden, head: LinearHead, scores, num_items):
    """The per-token divergence D (B, T) of the student's ``hidden`` to the teacher, without
    gradient: the loss with agreement and every other term off."""
    from .. import unisd_linear_loss, unisd_loss

    plain = setup.loss_cfg.replace(
        agreement="none", agreement_coverage=1.0, clip=None, clip_quantile=None,
        contrastive_weight=0.0, feature_weight=0.0, kd_weight=1.0)
    with torch.no_grad():
        if setup.loss_path != "linear":
            return unisd_loss(head.logits(hidden), scores["logits"], labels, config=plain,
                              num_items_in_batch=num_items,
                              impl=ctx.cfg.loss_impl).token_divergence
        t_head: LinearHead = scores.get("head", head)
        return unisd_linear_loss(
            hidden.detach(), head.weight, scores["hidden"], t_head.weight, labels,
            student_bias=head.bias, teacher_bias=t_head.bias, logit_softcap=head.softcap,
            logit_scale=head.scale, config=plain, num_items_in_batch=num_items,
            impl=ctx.cfg.loss_impl).token_divergence


def adaptive_views(ctx, setup: StepSetup, micro: Micro, divergence, teacher_hidden,
                   model) -> dict:
    """The K views scored on the selected sequences only, each view forward stopping after
    the last completion position of those sequences; called inside the student's root
    forward (``model``: the student's inner model, used itself for a shared teacher). Under
    FSDP every rank selects as many rows as the rank with most (its next by mass), so all
    ranks run the same forwards. Returns the views (hidden states (K, B, T, Ht), or their
    teacher logits on the logits path; zero hidden states where not scored), the view mask
    and the view-forward token counts."""
    from .. import select_view_rows

    loss_cfg, K = setup.loss_cfg, ctx.cfg.num_views
    B, T = micro.mask.shape
    sel = select_view_rows(divergence, micro.mask, loss_cfg.agreement_coverage,
                           loss_cfg.normalize)
    if setup.par.mode == "fsdp":
        agreed = int(all_reduce_max(float(len(sel.rows)), setup.par, ctx.device))
        sel = select_view_rows(divergence, micro.mask, loss_cfg.agreement_coverage,
                               loss_cfg.normalize, at_least=agreed)
    rows, length = sel.rows.tolist(), max(sel.length, 1)
    full_prompts = setup.views(micro.positions)
    counts = {"view_tokens_full": float(K * B * (max(map(len, full_prompts)) + T)),
              "view_tokens": 0.0, "covered": sel.covered * B}
    views = teacher_hidden.new_zeros(K, B, T, teacher_hidden.shape[-1])
    if rows:
        prompts = setup.views([micro.positions[r] for r in rows])
        counts["view_tokens"] = float(K * len(rows) * (max(map(len, prompts)) + length))
        y, mask = micro.completion[sel.rows, :length], micro.mask[sel.rows, :length]
        with setup.teacher.active() as teacher, phase(setup.timer, "views"):
            target = model if teacher is unwrap(setup.runner) else teacher
            scored = completion_hidden(target, prompts, y, mask, ctx.pad_id)
        views[:, sel.rows, :length] = scored.view(K, len(rows), length, -1).to(views.dtype)
    if setup.loss_path != "linear":
        with setup.teacher.active() as teacher:
            inner = teacher.model if isinstance(teacher, Runner) else teacher
            views = lm_head(model if teacher is unwrap(setup.runner) else inner).logits(views)
    return {"views": views, "view_mask": sel.view_mask, "counts": counts}


def _distill_loss(ctx, setup: StepSetup, micro: Micro, labels, scores, num_items):
    """The student's forward and the loss, as one function run inside the root forward."""
    loss_cfg = setup.loss_cfg
    prompts = [it.student for it in micro.items]
    feature = loss_cfg.needs_hidden
    found = {}

    def loss_of(model):
        with phase(setup.timer, "student_forward"):
            hidden = completion_hidden(model, prompts, micro.completion, micro.mask, ctx.pad_id)
        head = lm_head(model)
        if adaptive(loss_cfg):
            with phase(setup.timer, "selection"):
                d = _divergence(ctx, setup, labels, hidden, head, scores, num_items)
            found.update(adaptive_views(ctx, setup, micro, d, scores["hidden"], model))
            scores["views"] = found.pop("views")
        with phase(setup.timer, "loss"):
            return _loss(ctx, setup, labels, scores, num_items, hidden, head, feature,
                         found.get("view_mask"))

    loss, out = setup.runner(loss_of)
    return loss, out, found.get("counts", {})


def _loss(ctx, setup: StepSetup, labels, scores, num_items, hidden, head, feature, view_mask):
    """The UniSD loss of the student's lm_head inputs ``hidden`` against the teacher's."""
    cfg, loss_cfg = ctx.cfg, setup.loss_cfg
    if setup.loss_path == "linear":
        from .. import unisd_linear_loss

        t_head: LinearHead = scores.get("head", head)
        group = setup.par.tp_group
        if group is not None:
            head, t_head = vocab_shards(head, t_head, group)
        out = unisd_linear_loss(
            hidden, head.weight, scores["hidden"], t_head.weight, labels,
            student_bias=head.bias, teacher_bias=t_head.bias, view_hidden=scores.get("views"),
            negative_hidden=scores.get("negative"), logit_softcap=head.softcap,
            logit_scale=head.scale, config=loss_cfg, num_items_in_batch=num_items,
            impl=cfg.loss_impl, vocab_parallel=group, view_mask=view_mask)
    else:
        from .. import unisd_loss

        out = unisd_loss(
            head.logits(hidden),
            scores["logits"],
            labels,
            view_logits=scores.get("views"),
            negative_logits=scores.get("negative"),
            student_hidden=hidden if feature else None,
            teacher_hidden=scores["hidden"] if feature else None,
            config=loss_cfg,
            num_items_in_batch=num_items,
            impl=cfg.loss_impl,
            view_mask=view_mask,
        )
    return out.loss, out


def distill_micro(ctx, setup: StepSetup, micro: Micro, norm: dict) -> dict:
    """Backpropagate the micro-batch's share of the step's loss; its sums for the metrics."""
    ignore = setup.loss_cfg.ignore_index
    labels = torch.where(micro.mask, micro.completion, torch.full_like(micro.completion, ignore))
    scores = _teacher_scores(ctx, setup, micro, labels)
    loss, out, counts = _distill_loss(ctx, setup, micro, labels, scores, norm["num_items"])
    share = norm["share"](micro)
    with phase(setup.timer, "student_backward"):
        (loss * share * setup.par.data_world).backward()
    m = micro.mask.float()
    return {
        **counts,
        "loss": (out.loss.detach() * share).item(),
        "kd": (out.kd * share).item(),
        "contrastive": (out.contrastive * share).item(),
        "feature": (out.feature * share).item(),
        "weight_sum": (out.token_weight * m).sum().item(),
        "clipped_sum": (out.clipped.float() * m).sum().item(),
    }


def sft_micro(ctx, setup: StepSetup, micro: Micro, norm: dict) -> dict:
    """Cross-entropy on the gold completions: per-sequence means, a share of the mean over
    the step's sequences (SFT always normalises by sequence)."""
    prompts = [it.student for it in micro.items]
    gold, mask = micro.completion, micro.mask

    def loss_of(model):
        with phase(setup.timer, "student_forward"):
            hidden = completion_hidden(model, prompts, gold, mask, ctx.pad_id)
        with phase(setup.timer, "loss"):
            logits = lm_head(model).logits(hidden)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), gold,
                                                    reduction="none")
            m = mask.float()
            return ((nll * m).sum(1) / m.sum(1).clamp(min=1)).mean()

    loss = setup.runner(loss_of)
    share = norm["share"](micro)
    with phase(setup.timer, "student_backward"):
        (loss * share * setup.par.data_world).backward()
    return {"loss": (loss.detach() * share).item()}


def normaliser(ctx, setup: StepSetup, micros: list[Micro]) -> dict:
    """``num_items`` (token: the step's completion tokens over all ranks, else None) and
    ``share(micro)``, the factor that turns a micro-batch's loss into its share."""
    local = [sum(float(m.mask.sum()) for m in micros), float(sum(len(m.items) for m in micros))]
    tokens, sequences = all_reduce_sum(local, setup.par, ctx.device)
    if setup.loss_cfg is not None and setup.loss_cfg.normalize == "token":
        return {"num_items": max(tokens, 1.0), "share": lambda m: 1.0, "tokens": tokens,
                "sequences": sequences}
    return {"num_items": None, "share": lambda m: len(m.items) / sequences, "tokens": tokens,
            "sequences": sequences}


def accumulate(ctx, setup: StepSetup, micro_batches: list[tuple[list[int], list]]) -> dict:
    """Sample every micro-batch, then forward and backward each; gradients are reduced over
    ranks on the last one only. Returns the step's metrics, summed over micro-batches and
    ranks (the loss terms are those of the whole global batch)."""
    micros = [sample(ctx, setup, pos, items) for pos, items in micro_batches]
    norm = normaliser(ctx, setup, micros)
    fn = sft_micro if setup.loss_cfg is None else distill_micro
    sums: dict[str, float] = {}
    for i, micro in enumerate(micros):
        with gradient_sync(setup.runner, setup.par, enabled=i == len(micros) - 1):
            for key, value in fn(ctx, setup, micro, norm).items():
                sums[key] = sums.get(key, 0.0) + value
    keys = sorted(sums)
    reduced = all_reduce_sum([sums[k] for k in keys], setup.par, ctx.device)
    totals = dict(zip(keys, reduced, strict=True))
    record = {k: totals[k] for k in ("loss", "kd", "contrastive", "feature") if k in totals}
    if "weight_sum" in totals:
        record["mean_weight"] = totals["weight_sum"] / max(norm["tokens"], 1.0)
        record["clipped_frac"] = totals["clipped_sum"] / max(norm["tokens"], 1.0)
    if "view_tokens" in totals:
        record["view_token_frac"] = totals["view_tokens"] / max(totals["view_tokens_full"], 1.0)
        record["covered"] = totals["covered"] / max(norm["sequences"], 1.0)
    record["tokens"] = int(norm["tokens"])
    return record


class StepMemory:
    """Peak memory of one step, in MiB. CUDA: ``max_memory_allocated`` since the step began
    (the allocator's live tensors). CPU: the process's peak resident set size since the step
    began (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; with a kernel that
    refuses the reset, the peak since the process started, ``ru_maxrss``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = device.type != "cuda" and _reset_hwm()

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _reset_hwm()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.resettable:
            return _status_kb("VmHWM") / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") > 0
    except OSError:
        return False


def _status_kb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return 0.0
