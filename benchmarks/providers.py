"""The implementations compared, each a function ``inputs -> scalar loss`` for one config.

eager         benchmarks/eager.py: the paper's way, full fp32 log_softmax tensors
compile       torch.compile of eager, static shapes (recompiles per shape; the strongest)
compile-dynamic  torch.compile of eager with dynamic shapes (one compilation for all shapes;
              slower and, on CPU, far more memory than static: an opt-in for quick sweeps)
unisd         unisd_fast.unisd_loss(impl="auto"): Triton on CUDA, the chunked torch path on CPU
unisd-torch   impl="torch" (the same as unisd on CPU, so left out of CPU sweeps by default)
unisd-triton  impl="triton": compiled on CUDA; on CPU only in Triton's interpreter
unisd-stream  impl=TorchBackend(small_elements=0), the PyTorch path with its small-input path off:
              the two streaming passes at every size, to measure what that path saves
liger         Liger-Kernel's LigerJSD over fp32 log_softmax (beta=0 is forward KL), for the
              presets whose math it covers: fkl or jsd, no clip, agreement, contrastive or
              feature term. It normalises over tokens, so its errors are measured against
              the reference with normalize="token".
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from .eager import compiled_loss, eager_loss

ALL = ("eager", "compile", "compile-dynamic", "unisd", "unisd-torch", "unisd-triton",
       "unisd-stream", "liger")
CUDA_DEFAULT = ("eager", "compile", "unisd", "unisd-torch", "liger")
CPU_DEFAULT = ("eager", "compile", "unisd", "unisd-triton", "liger")
INTERPRETED = ("unisd-triton", "liger")  # need Triton: interpreter only on CPU
IMPL = {"unisd": "auto", "unisd-torch": "torch", "unisd-triton": "triton"}


def liger_covers(cfg) -> bool:
    """Whether LigerJSD computes this config's loss (up to its token normalisation)."""
    return (cfg.divergence in ("fkl", "jsd") and cfg.clip is None and cfg.clip_quantile is None
            and cfg.agreement == "none" and cfg.contrastive_weight == 0
            and cfg.feature_weight == 0)


def reference_config(name: str, cfg):
    """The config whose float64 reference a provider's output is compared with."""
    return cfg.replace(normalize="token") if name == "liger" else cfg


def unavailable(name: str, cfg, device: torch.device, elements: int,
                interpret_max: int) -> str | None:
    """Why ``name`` cannot run this case here, or None. ``elements`` = tokens x vocab."""
    if name not in ALL:
        return f"unknown provider (expected one of {ALL})"
    if name == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed (pip install --no-deps liger-kernel)"
        if not liger_covers(cfg):
            return "liger has no op for this preset (fkl/jsd without extra terms only)"
    if name in INTERPRETED and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "needs CUDA, or TRITON_INTERPRET=1 on CPU"
        if elements > interpret_max:
            return ("Triton interpreter on CPU: only run where tokens x vocab <= "
                    f"--interpret-max ({interpret_max})")
    return None


def _liger_fn(cfg):
    from liger_kernel.transformers import LigerJSD

    beta = 0.0 if cfg.divergence == "fkl" else cfg.jsd_alpha
    jsd = LigerJSD(beta=beta, ignore_index=cfg.ignore_index)
    tau = cfg.temperature

    def fn(inputs):
        z, u, labels = inputs["student_logits"], inputs["teacher_logits"], inputs["labels"]
        v = z.shape[-1]
        log_q = F.log_softmax(z.float() / tau, -1).view(-1, v)
        log_p = F.log_softmax(u.float() / tau, -1).view(-1, v)
        return cfg.kd_weight * jsd(log_q, log_p, labels.reshape(-1))

    return fn


def _streaming_fn(cfg):
    import unisd_fast
    from unisd_fast.backends.pytorch import TorchBackend

    backend = TorchBackend(small_elements=0)
    return lambda inputs: unisd_fast.unisd_loss(**inputs, config=cfg, impl=backend).loss


def make(name: str, cfg):
    """The function ``inputs -> loss`` of provider ``name`` for config ``cfg``."""
    if name == "eager":
        return lambda inputs: eager_loss(cfg, **inputs)
    if name in ("compile", "compile-dynamic"):
        compiled = compiled_loss(cfg, name == "compile-dynamic")
        return lambda inputs: compiled(**inputs)
    if name in IMPL:
        import unisd_fast

        impl = IMPL[name]
        return lambda inputs: unisd_fast.unisd_loss(**inputs, config=cfg, impl=impl).loss
    if name == "unisd-stream":
        return _streaming_fn(cfg)
    if name == "liger":
        return _liger_fn(cfg)
    raise ValueError(f"unknown provider {name!r}; expected one of {ALL}")
