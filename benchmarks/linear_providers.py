"""Inputs and providers of the fused-linear benchmark (``python -m benchmarks.linear``).

Hidden states and one lm_head shared by student and teacher (the LoRA self-distillation
case): the teacher's hidden states are random, the student's are near them, each view is the
teacher's plus noise, the negative is unrelated; the head gives logits of std about
``benchmarks.inputs.TEACHER_STD``. Labels are sampled from the student's distribution, row
block by row block (never a full logits tensor), about 10% ignored.

materialise-eager  the logits of every head input by F.linear, then benchmarks/eager.py (the
                   paper's way: full fp32 log_softmax tensors)
materialise-unisd  the same logits, then unisd_fast.unisd_loss(impl="auto")
linear             unisd_fast.unisd_linear_loss(impl="auto"): no logits tensor
liger              Liger-Kernel's LigerFusedLinearJSDLoss (chunked_loss; its defaults:
                   torch.compile'd chunks of 1024 rows), fkl (beta 0) or jsd only, no extra
                   terms; it normalises over tokens (the loss value differs for sequence
                   normalisation, the work does not)
trl                TRL 1.16's fused-linear divergence of its DistillationTrainer
                   (trainer/distillation_trainer.py::_chunked_divergence_loss over
                   kernels/chunked_divergence.py::ChunkedDivergenceFunction: float32 tiles of
                   4096 tokens x 32768 vocabulary, Triton on CUDA, its PyTorch tiles on CPU;
                   the GEMMs recomputed in backward); fkl (beta 0), rkl (1), jsd (alpha), no
                   extra terms; the token mean over the loss positions (compare it with
                   ``normalize=token`` presets, e.g. ``sd/normalize=token``)
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .inputs import DTYPES, IGNORE_FRACTION, IGNORE_INDEX, TEACHER_STD, config_for

PROVIDERS = ("materialise-eager", "materialise-unisd", "linear", "liger", "trl")
# TRL's divergence selector beta for each of ours (docs/trl.md)
TRL_BETA = {"fkl": lambda cfg: 0.0, "rkl": lambda cfg: 1.0, "jsd": lambda cfg: cfg.jsd_alpha}
HIDDEN_NOISE = 0.1
VIEW_NOISE = 0.3
LABEL_ROWS = 64


@dataclass(frozen=True)
class LinearCase:
    """preset, head ("frozen" or "trainable"), B, T, H, V, K views, dtype."""

    preset: str
    head: str
    batch: int
    seq: int
    hidden: int
    vocab: int
    views: int = 3
    dtype: str = "fp32"
    seed: int = 0

    @property
    def label(self) -> str:
        return (f"{self.preset} {self.head} B{self.batch}xT{self.seq} H{self.hidden} "
                f"V{self.vocab} {self.dtype}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_inputs(case: LinearCase, device) -> dict:
    """Keyword arguments of ``unisd_linear_loss`` (config excluded), deterministic in the
    seed. The student hidden states require grad, the head when ``case.head`` is trainable."""
    cfg = config_for(case.preset)
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device)
    gen.manual_seed(case.seed)
    B, T, H, V = case.batch, case.seq, case.hidden, case.vocab

    def normal(*shape, std=1.0):
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)

    weight = normal(V, H, std=TEACHER_STD / H ** 0.5)
    teacher = normal(B, T, H)
    student = teacher + normal(B, T, H, std=HIDDEN_NOISE)
    labels = torch.empty(B * T, dtype=torch.long, device=device)
    flat = student.view(-1, H)
    for r in range(0, B * T, LABEL_ROWS):
        logits = (flat[r:r + LABEL_ROWS] @ weight.t()).float()
        u = torch.rand(logits.shape, generator=gen, device=device).clamp_(1e-20, 1.0)
        labels[r:r + LABEL_ROWS] = (logits - u.log_().neg_().log_()).argmax(-1)
        del logits, u
    labels[torch.rand(B * T, generator=gen, device=device) < IGNORE_FRACTION] = IGNORE_INDEX
    out = {"student_hidden": student.requires_grad_(),
           "student_weight": weight.requires_grad_(case.head == "trainable"),
           "teacher_hidden": teacher, "labels": labels.view(B, T)}
    out["teacher_weight"] = out["student_weight"]
    if cfg.agreement != "none":
        out["view_hidden"] = torch.stack([teacher + normal(B, T, H, std=VIEW_NOISE)
                                          for _ in range(case.views)])
    if cfg.contrastive_weight > 0:
        out["negative_hidden"] = normal(B, T, H)
    return out


def grad_leaves(inputs: dict) -> list[torch.Tensor]:
    """The tensors that get a gradient: the student hidden states, the head if trainable."""
    return [t for t in (inputs["student_hidden"], inputs["student_weight"]) if t.requires_grad]


def liger_covers(cfg) -> bool:
    return cfg.divergence in ("fkl", "jsd") and divergence_only(cfg)


def divergence_only(cfg) -> bool:
    """The config is the divergence term alone (what the peers' fused-linear losses compute)."""
    return (cfg.clip is None and cfg.clip_quantile is None and cfg.agreement == "none"
            and cfg.contrastive_weight == 0 and cfg.feature_weight == 0)


def unavailable(name: str, cfg) -> str | None:
    """Why ``name`` cannot run this case, or None."""
    if name not in PROVIDERS:
        return f"unknown provider (expected one of {PROVIDERS})"
    if name == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed (pip install --no-deps liger-kernel)"
        if not liger_covers(cfg):
            return "liger's fused-linear JSD has no agreement/contrastive/feature/clip term"
    if name == "trl":
        if importlib.util.find_spec("trl") is None:
            return 'trl not installed (pip install "unisd-fast[trl]")'
        if not divergence_only(cfg):
            return "TRL's fused-linear divergence has no agreement/contrastive/feature/clip term"
    return None


def comparable_loss(name: str, cfg) -> bool:
    """Whether provider ``name`` computes our loss value for ``cfg`` (not only its work)."""
    if name == "liger":
        return False
    return name != "trl" or cfg.normalize == "token"


def _logits(inputs: dict) -> dict:
    """The materialised logits of every head input, as ``unisd_loss`` keywords."""
    w = inputs["student_weight"]
    out = {"student_logits": F.linear(inputs["student_hidden"], w),
           "labels": inputs["labels"], "student_hidden": inputs["student_hidden"],
           "teacher_hidden": inputs["teacher_hidden"]}
    with torch.no_grad():
        out["teacher_logits"] = F.linear(inputs["teacher_hidden"], w)
        if "view_hidden" in inputs:
            out["view_logits"] = F.linear(inputs["view_hidden"], w)
        if "negative_hidden" in inputs:
            out["negative_logits"] = F.linear(inputs["negative_hidden"], w)
    return out


def make(name: str, cfg, chunk_bytes: int | None = None):
    """The function ``inputs -> scalar loss`` of provider ``name`` for config ``cfg``."""
    import unisd_fast as usd

    if name == "materialise-eager":
        from .eager import eager_loss

        return lambda inputs: eager_loss(cfg, **_logits(inputs))
    if name == "materialise-unisd":
        return lambda inputs: usd.unisd_loss(**_logits(inputs), config=cfg).loss
    if name == "linear":
        return lambda inputs: usd.unisd_linear_loss(**inputs, config=cfg,
                                                    chunk_bytes=chunk_bytes).loss
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        beta = 0.0 if cfg.divergence == "fkl" else cfg.jsd_alpha
        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                          beta=beta, ignore_index=cfg.ignore_index,
                                          temperature=cfg.temperature)

        def fn(inputs):
            hs, w = inputs["student_hidden"], inputs["student_weight"]
            H = hs.shape[-1]
            return cfg.kd_weight * loss_fn(hs.view(-1, H), w,
                                           inputs["teacher_hidden"].view(-1, H), w.detach(),
                                           inputs["labels"].view(-1))

        return fn
    if name == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        beta = TRL_BETA[cfg.divergence](cfg)

        def fn(inputs):
            w = inputs["student_weight"]
            loss, _, _ = _chunked_divergence_loss(
                inputs["student_hidden"], inputs["teacher_hidden"], w, w.detach(),
                inputs["labels"] != cfg.ignore_index, beta, temperature=cfg.temperature)
            return cfg.kd_weight * loss

        return fn
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")
