"""The built-in facts task: generation, cached pre-training, evaluation, reports."""

import json
import random

import pytest
import torch

from unisd_fast.train import compare
from unisd_fast.train.config import DEFAULT_CONFIG, TrainConfig, load_config, parse_args
from unisd_fast.train.tasks import Example, facts

pytest.importorskip("peft")

SMALL_BASE = facts.PretrainConfig(
    hidden_size=32,
    num_layers=1,
    max_steps=3,
    check_every=3,
    batch_size=8,
    warmup_steps=1,
    num_facts=8,
    num_heldout=8,
)


def test_task_is_deterministic_and_well_formed():
    task = facts.facts_task(7)
    again = facts.facts_task(7)
    assert task.train == again.train and task.retention_prompts == again.retention_prompts
    assert task.train != facts.facts_task(8).train
    assert task.eval == task.train and len(task.train) == facts.NUM_FACTS
    keys = [ex.prompt for ex in task.train]
    assert len(set(keys)) == len(keys)
    for ex in task.train:
        assert len(ex.prompt) == facts.KEY_LENGTH + 1 and ex.prompt.endswith("=")
        assert ex.demonstration.isdigit() and len(ex.demonstration) == facts.CODE_DIGITS
        assert ex.negative.isdigit() and ex.negative != ex.demonstration
    t = task.templates
    assert t.teacher_text("zok=", "47") == "#zok=47\nzok="
    assert t.view_text("zok=", [("paz=", "12")]) == "#paz=12\nzok="


def test_pretraining_corpus_avoids_the_facts_and_teaches_copying():
    rng = random.Random(0)
    pairs = [facts.pretraining_pair(rng, exclude=set()) for _ in range(400)]
    kinds = {"copy": 0, "other": 0, "bare": 0}
    for prompt, code in pairs:
        if prompt.startswith("#"):
            reference, query = prompt[1:].split("\n")
            same = reference.split("=")[0] == query[:-1]
            kinds["copy" if same else "other"] += 1
            assert not same or reference.endswith(code)
        else:
            kinds["bare"] += 1
    assert all(n > 50 for n in kinds.values())
    letters = "abcdefghijklmnopqrstuvwxyz"
    every_key = {a + b + c for a in letters for b in letters for c in letters}
    allowed = {"abc", "abd"}
    rng = random.Random(1)
    for _ in range(3):
        prompt, _ = facts.pretraining_pair(rng, exclude=every_key - allowed)
        assert {line.lstrip("#")[:3] for line in prompt.split("\n")} <= allowed


def test_pretrained_base_is_cached_and_reloads_offline(tmp_path, monkeypatch):
    folder = facts.pretrained_base(tmp_path, SMALL_BASE)
    record = json.loads((folder / facts.PRETRAIN_RECORD).read_text())
    assert record["config"]["max_steps"] == 3 and 0 <= record["copy"] <= 1
    assert record["steps"] == 3 and record["checks"][-1][0] == 3

    def no_training(*args, **kwargs):
        raise AssertionError("the cached base should be reused")

    monkeypatch.setattr(facts, "pretrain_model", no_training)
    assert facts.pretrained_base(tmp_path, SMALL_BASE) == folder
    monkeypatch.undo()
    facts.pretrained_base(tmp_path, facts.PretrainConfig(**{**record["config"], "max_steps": 2}))
    assert json.loads((folder / facts.PRETRAIN_RECORD).read_text())["steps"] == 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer("#zok=47\nzok=")["input_ids"]) == "#zok=47\nzok="


class ScriptedModel:
    """Answers each prompt with a fixed completion and records the prompts it saw."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.prompts = tokenizer, answers, []

    def generate(self, input_ids, attention_mask, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            self.prompts.append(prompt)
            completion = self.tokenizer(self.answers[prompt])["input_ids"]
            rows.append(ids.tolist() + completion + [self.tokenizer.eos_token_id])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


def test_greedy_accuracy_on_a_hand_made_case():
    from unisd_fast.train.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    examples = [Example("abc=", "12"), Example("xyz=", "34"), Example("pqr=", "56")]
    model = ScriptedModel(tokenizer, {"abc=": "12", "xyz=": "43", "pqr=": " 56"})
    assert facts.greedy_accuracy(model, tokenizer, examples, reference=False) == 2 / 3
    assert facts.greedy_accuracy(model, tokenizer, examples, reference=False, max_batch=2) == (
        2 / 3
    )
    teacher = ScriptedModel(
        tokenizer, {f"#{e.prompt}{e.demonstration}\n{e.prompt}": "12" for e in examples}
    )
    assert facts.greedy_accuracy(teacher, tokenizer, examples, reference=True) == 1 / 3
    assert teacher.prompts[0] == "#abc=12\nabc="


def test_default_run_settings_sit_below_explicit_flags():
    cfg = parse_args([])
    assert facts.uses_facts(cfg) and cfg.method == "unisd_star"
    assert (cfg.lr, cfg.lora_r, cfg.batch_size) == (2e-3, 0, 32)
    assert parse_args(["--lr", "1e-4"]).lr == 1e-4
    arithmetic = parse_args(["--data", "builtin:arithmetic"])
    assert arithmetic.lr == TrainConfig.lr and not facts.uses_facts(arithmetic)
    assert parse_args(["--model", "some/model"]).lr == TrainConfig.lr
    with pytest.raises(ValueError, match="compare: 'nope'"):
        TrainConfig(compare="sd,nope")


def test_tables():
    first = {"accuracy": 0.03, "teacher_accuracy": 1.0, "kl_base": -1e-9, "retention_ppl": 1.5}
    last = {"accuracy": 0.95, "teacher_accuracy": 0.9, "kl_base": 0.25}
    table = compare.before_after_table({"first_eval": first, "eval": last})
    assert "3.0%" in table and "95.0%" in table and "0.250" in table and "-0" not in table
    assert table.splitlines()[-1].split()[-2:] == ["1.50", "-"]
    rows = compare.comparison_table(
        {"sd": {"first_eval": first, "eval": last, "wall_time_s": 12.0}}
    ).splitlines()
    assert rows[1].startswith("base") and rows[2].startswith("sd") and rows[2].endswith("12")


def test_default_and_compare_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(facts, "pretrain_config", lambda cfg: SMALL_BASE)
    fast = dict(
        max_steps=2,
        eval_every=1,
        batch_size=4,
        progress=False,
        save_final_model=False,
        eval_batch_size=64,
    )
    cfg = load_config(DEFAULT_CONFIG, **fast)
    summary = compare.run_reported(cfg.replace(output_dir=str(tmp_path / "one")))
    assert summary["step"] == 2 and "student accuracy" in capsys.readouterr().err
    lines = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["kind"] == "summary" and last["after"] == summary["eval"]

    result = compare.run_reported(cfg.replace(output_dir=str(tmp_path / "cmp"), compare="sft,sd"))
    assert set(result["methods"]) == {"sft", "sd"}
    assert (tmp_path / "cmp" / "compare.png").is_file()
    assert (tmp_path / "cmp" / "base_model" / facts.PRETRAIN_RECORD).is_file()
    err = capsys.readouterr().err
    assert "sft" in err and "base" in err


@pytest.mark.slow
def test_the_default_run_teaches_the_facts(tmp_path):
    """The default run (a few minutes on a laptop CPU): near chance to the teacher's level
    (100% on every run of results/default_run/spread.md), the base pre-trained to its target."""
    cfg = parse_args(["--output-dir", str(tmp_path), "--no-progress"])
    summary = compare.run_reported(cfg)
    record = json.loads((tmp_path / facts.BASE_FOLDER / facts.PRETRAIN_RECORD).read_text())
    assert record["reached"] and record["steps"] < facts.PretrainConfig.max_steps
    assert summary["first_eval"]["accuracy"] <= 0.1
    assert summary["eval"]["teacher_accuracy"] >= 0.99
    assert summary["eval"]["accuracy"] >= 0.95


def test_bare_command_config_file_and_run_are_the_same_job(tmp_path, monkeypatch):
    from unisd_fast.train import run

    bare = parse_args([])
    assert bare == parse_args(["--config", str(DEFAULT_CONFIG)]) == load_config(DEFAULT_CONFIG)
    assert (bare.data, bare.lr, bare.lora_r, bare.max_steps) == ("builtin:facts", 2e-3, 0, 400)
    monkeypatch.setattr(facts, "pretrain_config", lambda cfg: SMALL_BASE)
    fast = dict(max_steps=1, eval_at_start=False, progress=False, save_final_model=False)
    summary = run(load_config(DEFAULT_CONFIG, output_dir=str(tmp_path), **fast))
    assert (tmp_path / facts.BASE_FOLDER / facts.PRETRAIN_RECORD).is_file()  # run prepares
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"] == str(tmp_path / facts.BASE_FOLDER) and summary["step"] == 1
