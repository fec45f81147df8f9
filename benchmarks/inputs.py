"""Benchmark inputs in the on-policy self-distillation regime, and the case description.

The teacher's logits are random (std ``TEACHER_STD``); the student is the teacher plus a
little noise (it is the same model with a LoRA delta), each agreement view is the teacher
plus noise (the prompt with other demonstrations), the negative teacher is unrelated. Labels
are sampled from the student at temperature 1 (the on-policy completion), about 10% ignored.

Inputs are filled in blocks of rows so that building them allocates no temporary of the
inputs' full size: the peak memory of a run is then measured above the inputs alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

TEACHER_STD = 3.0
STUDENT_NOISE = 0.5
VIEW_NOISE = 1.0
NEGATIVE_STD = 3.0
HIDDEN_NOISE = 0.1
IGNORE_FRACTION = 0.1
IGNORE_INDEX = -100
FILL_ROWS = 256

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One benchmark shape: preset, batch B, sequence T, vocabulary V, hidden H, views K."""

    preset: str
    batch: int
    seq: int
    vocab: int
    dtype: str = "fp32"
    hidden: int = 256
    views: int = 3
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def label(self) -> str:
        return f"{self.preset} B{self.batch}xT{self.seq} V{self.vocab} {self.dtype}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        return cls(**d)


def config_for(preset: str):
    """The UniSDConfig of a preset name, or of ``name/field=value/...`` (the preset with those
    fields changed, e.g. ``sd/divergence=rkl/normalize=token``)."""
    from unisd_fast.config import UniSDConfig

    name, *changes = preset.split("/")
    fields = {}
    for change in changes:
        key, _, text = change.partition("=")
        try:
            fields[key] = float(text) if "." in text or "e" in text else int(text)
        except ValueError:
            fields[key] = text
    return UniSDConfig.preset(name, **fields)


def needs(cfg) -> tuple[bool, bool, bool]:
    """(views, negative, hidden) required by a config."""
    return cfg.agreement != "none", cfg.contrastive_weight > 0, cfg.feature_weight > 0


def _fill(out: torch.Tensor, gen: torch.Generator, std: float, base: torch.Tensor | None = None):
    """out[:] = base + std * N(0, 1), or std * N(0, 1), in place (no temporary)."""
    out.normal_(0.0, std, generator=gen)
    if base is not None:
        out.add_(base)


def _sample_labels(student: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per position from softmax(student) (Gumbel-max), ~10% set to ignore_index."""
    flat = student.view(-1, student.shape[-1])
    labels = torch.empty(flat.shape[0], dtype=torch.long, device=student.device)
    for r in range(0, flat.shape[0], FILL_ROWS):
        rows = flat[r:r + FILL_ROWS].float()
        u = torch.rand(rows.shape, generator=gen, device=rows.device).clamp_(1e-20, 1.0)
        labels[r:r + rows.shape[0]] = (rows - u.log_().neg_().log_()).argmax(-1)
    drop = torch.rand(labels.shape, generator=gen, device=labels.device) < IGNORE_FRACTION
    labels[drop] = IGNORE_INDEX
    return labels.view(student.shape[:-1])


def make_inputs(case: Case, device: str | torch.device = "cpu") -> dict:
    """Keyword arguments of ``unisd_loss`` for ``case`` (config excluded).

    The student logits (and student hidden states, when the preset uses them) require grad.
    Deterministic in ``case.seed`` on a given device.
    """
    cfg = config_for(case.preset)
    use_views, use_negative, use_hidden = needs(cfg)
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device)
    gen.manual_seed(case.seed)
    shape = (case.batch, case.seq, case.vocab)

    def empty(*s):
        return torch.empty(*s, dtype=dtype, device=device)

    teacher = empty(*shape)
    _fill(teacher, gen, TEACHER_STD)
    student = empty(*shape)
    _fill(student, gen, STUDENT_NOISE, base=teacher)
    out = {"student_logits": student, "teacher_logits": teacher,
           "labels": _sample_labels(student, gen)}
    if use_views:
        views = empty(case.views, *shape)
        for k in range(case.views):
            _fill(views[k], gen, VIEW_NOISE, base=teacher)
        out["view_logits"] = views
    if use_negative:
        negative = empty(*shape)
        _fill(negative, gen, NEGATIVE_STD)
        out["negative_logits"] = negative
    if use_hidden:
        th = empty(case.batch, case.seq, case.hidden)
        _fill(th, gen, 1.0)
        sh = empty(case.batch, case.seq, case.hidden)
        _fill(sh, gen, HIDDEN_NOISE, base=th)
        out["student_hidden"] = sh.requires_grad_(True)
        out["teacher_hidden"] = th
    student.requires_grad_(True)
    return out


def grad_leaves(inputs: dict) -> list[torch.Tensor]:
    """The tensors that receive a gradient: student logits, then student hidden if present."""
    leaves = [inputs["student_logits"]]
    if inputs.get("student_hidden") is not None:
        leaves.append(inputs["student_hidden"])
    return leaves


def clear_grads(inputs: dict) -> None:
    for t in grad_leaves(inputs):
        t.grad = None


def detached_copy(inputs: dict, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None) -> dict:
    """A copy of the inputs (floating tensors cast to ``dtype``), leaves requiring grad."""
    out = {}
    for key, t in inputs.items():
        t = t.detach()
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype=dtype, device=device, copy=True)
        else:
            t = t.to(device=device, copy=True)
        out[key] = t
    for t in grad_leaves(out):
        t.requires_grad_(True)
    return out


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def byte_budget(inputs: dict, mode: str) -> int:
    """Minimum HBM traffic of the two-pass algorithm (docs/kernels.md, "Byte budget"), in bytes.

    fwd_bwd: 2(|S| + |T|) + |dS| + (K+1)|view|, plus the hidden states (read twice, grad
    written once); fwd (stats pass): |S| + |T| + (K+1)|view| + |h_S| + |h_T|;
    bwd (gradient pass): |S| + |T| + |dS| + |h_S| + |h_T| + |dh_S|. fwd + bwd = fwd_bwd.
    (K+1)|view| counts only the views and the negative the preset actually uses.
    """
    s = tensor_bytes(inputs["student_logits"])
    t = tensor_bytes(inputs["teacher_logits"])
    aux = tensor_bytes(inputs.get("view_logits")) + tensor_bytes(inputs.get("negative_logits"))
    hs = tensor_bytes(inputs.get("student_hidden"))
    ht = tensor_bytes(inputs.get("teacher_hidden"))
    fwd = s + t + aux + hs + ht
    bwd = s + t + s + hs + ht + hs
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]
