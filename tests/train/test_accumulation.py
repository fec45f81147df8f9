"""Exact normalisation: one step with grad-accum 4 has the gradient of one micro-batch holding
the same four times the examples and completions (fixed completions, float64)."""

import copy
import random

import pytest
import torch

from unisd_fast.train.config import TrainConfig
from unisd_fast.train.data import Item
from unisd_fast.train.distributed import Parallel
from unisd_fast.train.loop import Context
from unisd_fast.train.models.tiny import build_tiny_model, build_tokenizer
from unisd_fast.train.step import StepSetup, accumulate
from unisd_fast.train.teachers import Runner, Scorer

BATCH, ACCUM, VIEWS = 2, 4, 2
FP64_TOL = dict(rtol=1e-9, atol=1e-12)
# unisd_linear_loss computes its loss and logit gradients in float32 (docs/api.md)
LINEAR_TOL = dict(rtol=1e-5, atol=1e-8)


def tokens(rng: random.Random, low: int, high: int, vocab: int) -> list[int]:
    return [rng.randrange(4, vocab) for _ in range(rng.randint(low, high))]


def completions(positions, items, vocab):
    """A fixed completion per stream position; lengths differ, so token and sequence
    normalisation differ."""
    return [tokens(random.Random(1000 + p), 1, 7, vocab) for p in positions]


def build(method: str, normalize: str, loss_path: str):
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, seed=0).double()
    teacher = Runner(copy.deepcopy(model).requires_grad_(False))
    overrides = {"agreement": "sequence", "agreement_gamma": 0.5, "normalize": normalize}
    cfg = TrainConfig(
        method=method,
        num_views=VIEWS,
        loss_impl="reference" if loss_path == "logits" else "torch",
        loss_path=loss_path,
        lora_r=0,
        **({} if method == "sft" else overrides),
    )
    rng = random.Random(0)
    items = [
        Item(i, tokens(rng, 2, 6, vocab), tokens(rng, 3, 9, vocab), tokens(rng, 3, 9, vocab),
             tokens(rng, 1, 5, vocab))
        for i in range(BATCH * ACCUM)
    ]
    runner = Runner(model)
    ctx = Context(cfg, runner, tokenizer, None, torch.device("cpu"), tokenizer.pad_token_id,
                  [tokenizer.eos_token_id], None, None)
    views = {p: [tokens(random.Random(7 * p + k), 2, 8, vocab) for k in range(VIEWS)]
             for p in range(BATCH * ACCUM)}
    setup = StepSetup(
        runner,
        Scorer(teacher),
        cfg.loss_config(),
        Parallel(),
        loss_path,
        sampler=lambda pos, its: completions(pos, its, vocab),
        views=lambda pos: [views[p][k] for k in range(VIEWS) for p in pos],
    )
    return model, ctx, setup, items


def gradient(model, ctx, setup, batches):
    model.zero_grad(set_to_none=True)
    record = accumulate(ctx, setup, batches)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, record


@pytest.mark.parametrize(
    "method, loss_path, normalize",
    [
        ("unisd_star", "linear", "token"),
        ("unisd_star", "linear", "sequence"),
        ("unisd_star", "logits", "token"),
        ("unisd_star", "logits", "sequence"),
        ("sft", "logits", "sequence"),  # SFT is always per-sequence
    ],
)
def test_accumulated_step_equals_one_big_micro_batch(method, loss_path, normalize):
    model, ctx, setup, items = build(method, normalize, loss_path)
    positions = list(range(BATCH * ACCUM))
    whole, whole_rec = gradient(model, ctx, setup, [(positions, items)])
    chunks = [
        (positions[i : i + BATCH], items[i : i + BATCH]) for i in range(0, len(items), BATCH)
    ]
    accum, accum_rec = gradient(model, ctx, setup, chunks)
    assert len(chunks) == ACCUM
    tol = LINEAR_TOL if loss_path == "linear" else FP64_TOL
    for name, g in whole.items():
        torch.testing.assert_close(accum[name], g, **tol, msg=name)
    assert accum_rec["loss"] == pytest.approx(whole_rec["loss"], rel=tol["rtol"])
    assert accum_rec["tokens"] == whole_rec["tokens"]
    if method != "sft":
        for key in ("kd", "contrastive", "feature", "mean_weight"):
            assert accum_rec[key] == pytest.approx(whole_rec[key], rel=tol["rtol"]), key


def test_the_normalisations_differ_here():
    """The completions' lengths differ, so the test above tells the two apart."""
    recs = {}
    for normalize in ("token", "sequence"):
        model, ctx, setup, items = build("sd", normalize, "logits")
        recs[normalize] = gradient(model, ctx, setup, [(list(range(len(items))), items)])[1]
    assert recs["token"]["loss"] != pytest.approx(recs["sequence"]["loss"], rel=1e-3)


def test_linear_and_logits_paths_agree():
    """The fused-linear step (no logits) has the gradient of the logits step."""
    out = {}
    for path in ("linear", "logits"):
        model, ctx, setup, items = build("unisd_star", "token", path)
        out[path] = gradient(model, ctx, setup, [(list(range(len(items))), items)])
    for name, g in out["logits"][0].items():
        torch.testing.assert_close(out["linear"][0][name], g, **LINEAR_TOL, msg=name)
    assert out["linear"][1]["loss"] == pytest.approx(out["logits"][1]["loss"], rel=1e-5)
