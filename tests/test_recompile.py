"""No silent slow path on CPU: a process that cycles through 20 (divergence, alpha, tau,
dtype) combinations keeps every block on a compiled graph, compiles a small fixed set of
graphs (one per block function and dtype) and never reaches dynamo's recompile limit.

Runs in a fresh interpreter with the compiled backend forced on. The graphs go through a
counting ``torch.compile`` backend (no code generation, so the test is quick): dynamo's
guards and recompilations are the same as with inductor (tests/test_compiled_cpu.py runs
inductor itself)."""

import textwrap

import pytest
import torch
from compiled_process import run_compiled

SCRIPT = textwrap.dedent("""
    import itertools, logging, warnings
    import torch
    import unisd_fast as usd
    from unisd_fast.backends.pytorch import TorchBackend
    from loss_inputs import make_inputs, run_loss

    graphs, calls = [], [0]

    def counting(gm, example_inputs):
        graphs.append(gm)
        def run(*args):
            calls[0] += 1
            return gm.forward(*args)
        return run

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("torch._dynamo").addHandler(handler)
    warnings.simplefilter("error")

    # the small-input path on and off: two backends, one compiler
    backends = {streaming: TorchBackend(compile=True, compiler=counting, compile_min_elements=0,
                                        small_elements=0 if streaming else 1 << 20)
                for streaming in (False, True)}

    divergences = ("fkl", "rkl", "jsd")
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    combos = []
    for i in range(20):
        combos.append((divergences[i % 3], 0.1 + 0.04 * i, 0.5 + 0.05 * i, dtypes[i // 3 % 3]))
    assert len(set(combos)) == 20 and len({c[3] for c in combos}) == 3
    for cycle in range(2):
        for i, (divergence, alpha, tau, dtype) in enumerate(combos):
            cfg = usd.UniSDConfig(divergence=divergence, jsd_alpha=alpha, temperature=tau,
                                  contrastive_weight=0.1, agreement="token")
            # varying row counts, at least two per function within the first cycle: the
            # whole-loss functions (small.py) make a size dynamic when it first changes
            T = 3 + (cycle + i // 2) % 4
            inputs = make_inputs(B=2, T=T, V=257, dtype=dtype)
            # every other combination with the small-input path off (the streaming passes)
            streaming = i % 2 == 1
            before = calls[0]
            out, (gz, _) = run_loss(inputs, cfg, backends[streaming])
            assert torch.isfinite(out.loss) and torch.isfinite(gz).all()
            # streaming: the stats and the gradient pass + the label pass of the views
            # (stacked: one call at this size) and of the negative, all compiled; small
            # inputs: the whole loss in one compiled call (small.py)
            assert calls[0] - before >= (2 + 1 + 1 if streaming else 1), (calls[0] - before)
        if cycle == 0:
            first = len(graphs)
    counters = torch._dynamo.utils.counters
    limit = [m for m in messages if "recompile_limit" in m or "cache_size_limit" in m]
    assert not limit, limit
    assert len(graphs) == first, (first, len(graphs))   # the second cycle compiled nothing
    # one graph per (block function, dtype) at most, plus one per dynamic-shape re-trace
    assert first <= 2 * (3 + 3 + 2 + 3 + 1 + 3) * 3, first
    print("graphs", first, "calls", calls[0], "frames", dict(counters["frames"]))
    print("stayed compiled")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA runs Triton")
def test_twenty_combinations_stay_compiled():
    stdout = run_compiled(SCRIPT)
    assert "stayed compiled" in stdout
    print(stdout)
