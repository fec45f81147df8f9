"""``unisd_linear_loss(..., vocab_parallel=...)``: heads split by vocabulary rows over 2 and 3
gloo ranks (torchrun, CPU) against the single-process loss on the gathered head and the
float64 reference, every divergence and option, and ``unisd_loss(..., vocab_parallel=...)``
on logits split so against the gathered logits (tests/vocab_parallel_worker.py runs the
cases, one launch per world size); the argument checks in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from unisd_fast import UniSDConfig, unisd_linear_loss, unisd_loss
from unisd_fast.vocab_parallel import VocabParallel

WORKER = Path(__file__).with_name("vocab_parallel_worker.py")
sys.path.insert(0, str(WORKER.parent))
from vocab_parallel_worker import CASES  # noqa: E402

# max relative error against the gathered head's loss in the same dtype: float32 rounding of
# sums in another order (near the teacher, where D is 1e-6 of its terms, a few digits fewer)
DENSE_TOL = {"float32": 1e-5, "near": 1e-4, "bfloat16": 1e-5}


def launch(tmp_path, world: int, vocab: int, names=()) -> dict:
    out = tmp_path / f"errors-{world}-{vocab}.json"
    env = {**os.environ, "VOCAB": str(vocab), "UNISD_FAST_COMPILE": "0",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", str(WORKER), str(out), *names]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    causes = [line for line in result.stderr.splitlines()
              if "what()" in line or line.startswith("[rank") and "Error" in line]
    assert result.returncode == 0, "\n".join(causes[:20]) + result.stderr[-3000:]
    return json.loads(out.read_text())


def check(errors: dict) -> None:
    assert all(errors.pop("_checks").values())
    for name, e in errors.items():
        case = CASES[name]
        kind = "near" if case.get("near") else str(case.get("dtype", torch.float32))[6:]
        assert e["dense"] <= DENSE_TOL[kind], (name, e)
        # as close to float64 as the dense loss is (the reference's rounding is shared)
        assert e["reference"] <= 2 * e["dense_vs_reference"] + 1e-6, (name, e)


@pytest.mark.parametrize("world", [2, 3])
def test_split_heads_match_the_gathered_head(tmp_path, world):
    """Every case at V = 37: uneven shards (19/18, 13/12/12), 3-row chunks."""
    errors = launch(tmp_path, world, 37)
    assert set(errors) == {*CASES, "_checks"}
    check(errors)


@pytest.mark.slow
def test_split_heads_over_several_vocab_tiles(tmp_path):
    """Shards of 1250 rows: two CPU vocabulary tiles each."""
    names = ["fkl", "jsd", "clip-quantile", "agreement-token", "contrastive", "bf16-fkl"]
    check(launch(tmp_path, 2, 2500, names))


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _args(V=11, H=4):
    hs = torch.randn(1, 3, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    return hs, w, hs.detach(), w.detach() * 0.9, torch.tensor([[0, V - 1, 3]])


def test_one_rank_group_is_the_dense_loss(one_rank_group):
    hs, w, ht, wt, y = _args()
    cfg = UniSDConfig(divergence="jsd")
    split = unisd_linear_loss(hs, w, ht, wt, y, config=cfg, impl="torch",
                              vocab_parallel=one_rank_group)
    whole = unisd_linear_loss(hs, w, ht, wt, y, config=cfg, impl="torch")
    torch.testing.assert_close(split.loss, whole.loss)


def test_bad_vocab_parallel_arguments(one_rank_group):
    hs, w, ht, wt, y = _args()
    with pytest.raises(TypeError, match="vocab_parallel must be"):
        unisd_linear_loss(hs, w, ht, wt, y, vocab_parallel="tp")
    with pytest.raises(ValueError, match="add up to 11 rows, not vocab_size=12"):
        unisd_linear_loss(hs, w, ht, wt, y, impl="torch",
                          vocab_parallel=VocabParallel(one_rank_group, vocab_size=12))
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        unisd_linear_loss(hs, w, ht, wt, y, vocab_parallel=VocabParallel(vocab_size=0))
    with pytest.raises(ValueError, match="impl='reference' takes whole heads"):
        unisd_linear_loss(hs, w, ht, wt, y, impl="reference", vocab_parallel=one_rank_group)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\)"):
        unisd_linear_loss(hs, w, ht, wt, y + 5, impl="torch", vocab_parallel=one_rank_group)


def test_bad_vocab_parallel_logits(one_rank_group):
    z, u = torch.randn(1, 3, 11), torch.randn(1, 3, 11)
    y = torch.tensor([[0, 10, 3]])
    with pytest.raises(ValueError, match="add up to 11 rows, not vocab_size=13"):
        unisd_loss(z, u, y, vocab_parallel=VocabParallel(one_rank_group, vocab_size=13))
    with pytest.raises(ValueError, match="impl='reference' takes whole logits"):
        unisd_loss(z, u, y, impl="reference", vocab_parallel=one_rank_group)
    with pytest.raises(ValueError, match="sparse support"):
        unisd_loss(z, u, y, config=UniSDConfig(topk=4), vocab_parallel=one_rank_group)
    with pytest.raises(TypeError, match="student_logits must be"):
        unisd_loss([1.0], u, y, vocab_parallel=one_rank_group)
    whole = unisd_loss(z, u, y, impl="torch")
    split = unisd_loss(z, u, y, impl="torch", vocab_parallel=one_rank_group)
    torch.testing.assert_close(split.loss, whole.loss)


def test_dtensor_heads_must_be_row_sharded(one_rank_group):
    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh
    mesh = init_device_mesh("cpu", (1,))
    hs, w, ht, wt, y = _args()
    replicated = DTensor.from_local(w, mesh, (Replicate(),))
    with pytest.raises(ValueError, match="sharded on dimension 0"):
        unisd_linear_loss(hs, replicated, ht, wt, y, impl="torch")
    sharded = DTensor.from_local(w, mesh, (Shard(0),))
    with pytest.raises(ValueError, match="every head tensor as a DTensor"):
        unisd_linear_loss(hs, sharded, ht, wt, y, impl="torch")


def test_benchmark_counts_the_collectives_of_the_formula(tmp_path):
    """benchmarks/vocab_parallel.py at a tiny shape, 3 ranks: the bytes its wrapped
    collectives carried are those of its analytic count (every collective is accounted for)."""
    sys.path.insert(0, str(WORKER.parents[1]))
    from benchmarks.vocab_parallel import analytic, main
    main(["--ranks", "3", "--tokens", "8", "--vocab", "50", "--hidden", "8", "--reps", "1",
          "--divergences", "fkl,jsd", "--out", str(tmp_path)])
    measured = json.loads((tmp_path / "results.json").read_text())
    for divergence in ("fkl", "jsd"):
        expected = analytic(8, 8, 3, divergence)["total"] / 8
        assert measured[divergence]["bytes_per_token"] == pytest.approx(expected), divergence
    assert "| jsd |" in (tmp_path / "table.md").read_text()
