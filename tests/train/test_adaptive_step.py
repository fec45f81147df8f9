"""Adaptive agreement in the training step: views scored on the selected rows only, the
view forwards truncated, and the step's gradient that of the loss with that view mask,
computed here from full-length views of every row (float64, two micro-batches, exact
normalisation)."""

import copy
import random

import pytest
import torch

import unisd_fast as usd
from unisd_fast.train.config import TrainConfig
from unisd_fast.train.data import Item
from unisd_fast.train.distributed import Parallel
from unisd_fast.train.loop import Context
from unisd_fast.train.models.tiny import build_tiny_model, build_tokenizer
from unisd_fast.train.rollout import right_pad
from unisd_fast.train.step import StepSetup, accumulate
from unisd_fast.train.teachers import Runner, Scorer, completion_hidden, lm_head

BATCH, ACCUM, VIEWS = 4, 2, 3


def tokens(rng, low, high, vocab):
    return [rng.randrange(4, vocab) for _ in range(rng.randint(low, high))]


def build(normalize, loss_path, coverage, shared):
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, seed=0).double()
    cfg = TrainConfig(method="unisd_star", num_views=VIEWS, lora_r=0, loss_path=loss_path,
                      loss_impl="reference" if loss_path == "logits" else "torch",
                      agreement_gamma=1.0, normalize=normalize,
                      agreement_coverage=coverage)
    rng = random.Random(0)
    items = [Item(i, tokens(rng, 2, 6, vocab), tokens(rng, 3, 9, vocab),
                  tokens(rng, 3, 9, vocab), tokens(rng, 1, 5, vocab))
             for i in range(BATCH * ACCUM)]
    runner = Runner(model)
    teacher = Scorer(runner) if shared else Scorer(Runner(copy.deepcopy(model)))
    ctx = Context(cfg, runner, tokenizer, None, torch.device("cpu"), tokenizer.pad_token_id,
                  [tokenizer.eos_token_id], None, None)
    views = {p: [tokens(random.Random(7 * p + k), 2, 8, vocab) for k in range(VIEWS)]
             for p in range(BATCH * ACCUM)}
    completions = {p: tokens(random.Random(1000 + p), 1, 7, vocab) for p in views}
    setup = StepSetup(runner, teacher, cfg.loss_config(), Parallel(), loss_path,
                      sampler=lambda pos, its: [completions[p] for p in pos],
                      views=lambda pos: [views[p][k] for k in range(VIEWS) for p in pos])
    return model, ctx, setup, items


def by_hand(model, ctx, setup, chunks):
    """The step's loss from full-length views of every row, with the view mask of the
    selection made from the per-token divergence of each micro-batch."""
    cfg = setup.loss_cfg
    micros = []
    for pos, its in chunks:
        y, mask = right_pad(setup.sampler(pos, its), ctx.pad_id, ctx.device)
        micros.append((pos, its, y, mask))
    total_tokens = float(sum(m[3].sum() for m in micros))
    total_rows = sum(len(m[0]) for m in micros)
    loss = 0.0
    for pos, its, y, mask in micros:
        labels = torch.where(mask, y, cfg.ignore_index)
        with setup.teacher.active() as t:
            inner = t.model
            u_h = completion_hidden(inner, [it.teacher for it in its], y, mask, ctx.pad_id)
            v_h = completion_hidden(inner, setup.views(pos), y, mask, ctx.pad_id)
            n_h = completion_hidden(inner, [it.negative for it in its], y, mask, ctx.pad_id)
            head = lm_head(inner)
            u, n = head.logits(u_h), head.logits(n_h)
            v = head.logits(v_h).view(VIEWS, len(pos), *u.shape[1:])
        h = completion_hidden(model, [it.student for it in its], y, mask, ctx.pad_id)
        z = lm_head(model).logits(h)
        items = total_tokens if cfg.normalize == "token" else None
        plain = usd.unisd_loss(z.detach(), u, labels, config=usd.UniSDConfig(
            normalize=cfg.normalize), num_items_in_batch=items, impl="reference")
        sel = usd.select_view_rows(plain.token_divergence, mask, cfg.agreement_coverage,
                                   cfg.normalize)
        out = usd.unisd_loss(z, u, labels, view_logits=v, negative_logits=n,
                             student_hidden=h, teacher_hidden=u_h, config=cfg,
                             num_items_in_batch=items, impl="reference",
                             view_mask=sel.view_mask)
        share = 1.0 if cfg.normalize == "token" else len(pos) / total_rows
        loss = loss + out.loss * share
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("normalize, loss_path, shared", [
    ("token", "linear", False), ("sequence", "linear", True), ("sequence", "logits", False)])
def test_adaptive_step_is_the_loss_with_the_selection_mask(normalize, loss_path, shared):
    model, ctx, setup, items = build(normalize, loss_path, 0.6, shared)
    positions = list(range(len(items)))
    chunks = [(positions[i:i + BATCH], items[i:i + BATCH]) for i in range(0, len(items), BATCH)]
    model.zero_grad(set_to_none=True)
    record = accumulate(ctx, setup, chunks)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss, expected = by_hand(model, ctx, setup, chunks)
    tol = dict(rtol=1e-5, atol=1e-8) if loss_path == "linear" else dict(rtol=1e-9, atol=1e-12)
    assert record["loss"] == pytest.approx(loss, rel=tol["rtol"])
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, **tol, msg=name)
    assert record["covered"] >= 0.6
    assert 0 < record["view_token_frac"] < 1


def test_full_coverage_keeps_the_full_step():
    model, ctx, setup, items = build("token", "linear", 1.0, False)
    batch = [(list(range(len(items))), items)]
    record = accumulate(ctx, setup, batch)
    assert "view_token_frac" not in record
