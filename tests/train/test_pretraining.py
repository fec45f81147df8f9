"""The facts base's pre-training: it stops on held-out copying accuracy, not a step count."""

import json
import logging

import pytest
import torch

from unisd_fast.train import loop
from unisd_fast.train.config import TrainConfig, parse_args
from unisd_fast.train.tasks import facts

pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_layers=1, batch_size=4, warmup_steps=1, num_facts=4, num_heldout=4)


def test_stop_needs_the_target_at_consecutive_checks():
    stop = facts.CopyingStop(target=0.99, in_a_row=2)
    answers = [stop.update(step, acc) for step, acc in enumerate([0.5, 0.995, 0.98, 0.99, 1.0])]
    assert answers == [False, False, False, False, True]
    assert stop.checks[-1] == (4, 1.0) and stop.reached
    once = facts.CopyingStop(target=0.9, in_a_row=1)
    assert once.update(1, 0.9) and once.reached
    assert not facts.CopyingStop(target=0.5, in_a_row=3).reached


def scripted_copying(monkeypatch, accuracies):
    """greedy_accuracy answers ``accuracies`` in turn (held-out checks during pre-training)."""
    calls = iter(accuracies)

    def scripted(model, tokenizer, examples, reference, max_batch=64):
        assert reference and len(examples) == TINY["num_heldout"] and not model.training
        return next(calls)

    monkeypatch.setattr(facts, "greedy_accuracy", scripted)


def test_pretraining_stops_at_the_second_check_in_a_row(monkeypatch):
    scripted_copying(monkeypatch, [0.2, 1.0, 0.5, 0.99, 1.0, 1.0])
    excluded = []
    draw = facts.pretraining_pair
    monkeypatch.setattr(
        facts,
        "pretraining_pair",
        lambda rng, exclude: excluded.append(exclude) or draw(rng, exclude),
    )
    cfg = facts.PretrainConfig(**TINY, max_steps=40, check_every=2, checks_in_a_row=2)
    _, model, stop = facts.pretrain_model(cfg)
    assert [s for s, _ in stop.checks] == [2, 4, 6, 8, 10]
    assert stop.reached and not model.training
    assert len(excluded) == 10 * cfg.batch_size
    heldout = {ex.prompt[:-1] for ex in facts.heldout_references(cfg)}
    taught = {ex.prompt[:-1] for ex in facts.facts_task(cfg.seed, cfg.num_facts).train}
    assert excluded[0] == heldout | taught


def test_pretraining_stops_at_its_cap_when_the_target_is_missed(monkeypatch):
    scripted_copying(monkeypatch, [1.0, 0.5, 1.0, 0.5])
    cfg = facts.PretrainConfig(**TINY, max_steps=7, check_every=2, checks_in_a_row=2)
    seen = []
    _, _, stop = facts.pretrain_model(cfg, lambda step, loss, copy: seen.append((step, copy)))
    assert stop.checks == [(2, 1.0), (4, 0.5), (6, 1.0), (7, 0.5)] == seen
    assert not stop.reached


def test_an_unreached_target_warns_and_is_recorded_and_warns_again_from_the_cache(
    tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(facts, "greedy_accuracy", lambda *args, **kwargs: 0.5)
    cfg = facts.PretrainConfig(**TINY, max_steps=2, check_every=1)
    with caplog.at_level(logging.WARNING, logger="unisd_fast.facts"):
        folder = facts.pretrained_base(tmp_path, cfg)
    record = json.loads((folder / facts.PRETRAIN_RECORD).read_text())
    assert record["steps"] == 2 and record["checks"] == [[1, 0.5], [2, 0.5]]
    assert not record["reached"]
    assert "cap of 2 steps" in caplog.text and "50.0%" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unisd_fast.facts"):
        assert facts.pretrained_base(tmp_path, cfg) == folder
    assert "cap of 2 steps" in caplog.text


def test_a_reachable_target_stops_early_and_is_recorded(tmp_path):
    cfg = facts.PretrainConfig(**TINY, max_steps=50, check_every=3, target_copy=0.0)
    record = json.loads((facts.pretrained_base(tmp_path, cfg) / facts.PRETRAIN_RECORD).read_text())
    assert record["reached"] and record["steps"] == 6
    assert [s for s, _ in record["checks"]] == [3, 6]


def test_heldout_references_avoid_the_facts_and_the_corpus():
    cfg = facts.PretrainConfig(num_heldout=300)
    heldout = facts.heldout_references(cfg)
    assert heldout == facts.heldout_references(cfg) and len(heldout) == 300
    keys = {ex.prompt for ex in heldout}
    assert len(keys) == 300
    assert not keys & {ex.prompt for ex in facts.facts_task(cfg.seed).train}
    assert heldout != facts.heldout_references(facts.PretrainConfig(num_heldout=300, seed=1))


@pytest.mark.parametrize(
    "field, value",
    [("max_steps", 0), ("check_every", -1), ("checks_in_a_row", 1.5), ("target_copy", 1.2)],
)
def test_bad_pretrain_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"PretrainConfig.{field}"):
        facts.PretrainConfig(**{field: value})


def test_deterministic_flag_holds_for_the_run_only():
    assert parse_args(["--deterministic"]).deterministic and not parse_args([]).deterministic
    before = torch.are_deterministic_algorithms_enabled()
    with loop.deterministic_algorithms(TrainConfig(deterministic=True)):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    with loop.deterministic_algorithms(TrainConfig()):
        assert torch.are_deterministic_algorithms_enabled() == before
