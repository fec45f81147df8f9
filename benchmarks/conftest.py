"""Options and parametrisation of the pytest-benchmark suite (``pytest benchmarks``).

Every provider of one (preset, mode, shape, dtype) shares one benchmark group, so
pytest-benchmark's table shows eager, compile and the fused implementation side by side.
Shapes are small by default on CPU; pass e.g. ``--bench-vocab 151936 --bench-tokens 8192``
on GPU. ``--benchmark-json FILE`` writes pytest-benchmark's JSON.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton kernels

DEFAULTS = {"cpu": {"vocab": "8192", "tokens": "256", "dtype": "fp32",
                    "providers": "eager,compile,unisd,unisd-triton,liger"},
            "cuda": {"vocab": "32000,151936", "tokens": "4096", "dtype": "bf16",
                     "providers": "eager,compile,unisd,unisd-torch,liger"}}


def pytest_addoption(parser):
    g = parser.getgroup("unisd benchmarks")
    g.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    g.addoption("--bench-providers", default=None, help="comma list of providers")
    g.addoption("--bench-presets", default="sd,unisd_star", help="comma list of presets")
    g.addoption("--bench-vocab", default=None, help="comma list of vocab sizes")
    g.addoption("--bench-tokens", default=None, help="comma list of token counts (B=4)")
    g.addoption("--bench-dtype", default=None, help="fp32, bf16 or fp16")
    g.addoption("--bench-modes", default="fwd,bwd,fwd_bwd", help="comma list of modes")
    g.addoption("--bench-rounds", type=int, default=5, help="timed rounds per benchmark")
    g.addoption("--bench-interpret-max", type=int, default=2**16,
                help="CPU: largest tokens x vocab for Triton-interpreted providers")


def _opt(config, name: str, device: str) -> list[str]:
    value = config.getoption(f"--bench-{name}") or DEFAULTS[device][name]
    return [x.strip() for x in value.split(",") if x.strip()]


def bench_device(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    device = bench_device(cfg)
    params, ids = [], []
    for preset in _opt(cfg, "presets", device):
        for tokens in _opt(cfg, "tokens", device):
            for vocab in _opt(cfg, "vocab", device):
                for mode in _opt(cfg, "modes", device):
                    for provider in _opt(cfg, "providers", device):
                        params.append((preset, int(tokens), int(vocab), mode, provider))
                        ids.append(f"{preset}-N{tokens}-V{vocab}-{mode}-{provider}")
    metafunc.parametrize("bench_case", params, ids=ids)
