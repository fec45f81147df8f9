"""pytest-benchmark suite: ``pytest benchmarks [--benchmark-json out.json] [--bench-...]``.

One group per (preset, mode, shape, dtype) holds every provider, all timed on the same input
tensors with fresh gradients each round. Each provider's loss is also checked against the
eager loss on those inputs, so ``--benchmark-disable`` makes this a fast smoke test.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import providers
from benchmarks.conftest import _opt, bench_device
from benchmarks.eager import eager_loss
from benchmarks.inputs import Case, byte_budget, clear_grads, config_for, make_inputs

BATCH = 4
_INPUTS: dict = {}


def _inputs(case: Case, device: str) -> dict:
    """One set of inputs per case, shared by every provider (the last one is kept)."""
    key = (case, device)
    if key not in _INPUTS:
        _INPUTS.clear()
        inputs = make_inputs(case, device)
        with torch.no_grad():
            ref = eager_loss(config_for(case.preset), **inputs)
        _INPUTS[key] = (inputs, float(ref))
    return _INPUTS[key]


def test_unisd_loss(benchmark, bench_case, request):
    preset, tokens, vocab, mode, name = bench_case
    device = bench_device(request.config)
    dtype = _opt(request.config, "dtype", device)[0]
    case = Case(preset, BATCH, tokens // BATCH, vocab, dtype)
    cfg = config_for(preset)
    why = providers.unavailable(name, cfg, torch.device(device), tokens * vocab,
                                request.config.getoption("--bench-interpret-max"))
    if why:
        pytest.skip(why)
    inputs, eager_value = _inputs(case, device)
    fn = providers.make(name, cfg)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    benchmark.group = f"{preset} {mode} B{BATCH}xT{tokens // BATCH} V{vocab} {dtype}"
    benchmark.extra_info.update(provider=name, preset=preset, mode=mode, tokens=tokens,
                                vocab=vocab, dtype=dtype, bytes=byte_budget(inputs, mode))
    state = {}

    def setup():
        clear_grads(inputs)
        state.clear()
        if mode == "bwd":
            state["loss"] = fn(inputs)
            sync()
        return (), {}

    def target():
        loss = state.pop("loss") if mode == "bwd" else fn(inputs)
        if mode != "fwd":
            loss.backward()
        sync()
        return loss

    loss = benchmark.pedantic(target, setup=setup, warmup_rounds=1,
                              rounds=request.config.getoption("--bench-rounds"), iterations=1)
    clear_grads(inputs)
    value = float(loss.detach())
    assert value == value and abs(value) != float("inf"), f"{name} loss is {value}"
    if providers.reference_config(name, cfg) == cfg:  # same math as eager
        tol = 1e-3 if dtype == "fp32" else 2e-2
        assert value == pytest.approx(eager_value, rel=tol, abs=tol)
