"""Data files, built-in tasks, prompt templates, and TrainConfig validation/CLI."""

import dataclasses
import json

import pytest

from unisd_fast.train import tasks as data
from unisd_fast.train.config import TrainConfig, parse_args
from unisd_fast.train.errors import ConfigError, DataError
from unisd_fast.train.models.tiny import build_tokenizer
from unisd_fast.train.prompts import PromptEncoder, PromptTemplates
from unisd_fast.train.tasks import Example, load_jsonl, load_task


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))
    return path


def test_load_jsonl_reads_optional_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "p", "demonstration": "d", "negative": "n", "id": 3},
            "",
            {"prompt": "q", "demonstration": "e"},
        ],
    )
    assert load_jsonl(path) == [Example("p", "d", "n"), Example("q", "e")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"prompt": "p"}, r"d.jsonl:2: missing field 'demonstration'"),
        (
            {"prompt": 3, "demonstration": "d"},
            r"d.jsonl:2: field 'prompt' must be a non-empty string",
        ),
        ({"prompt": "p", "demonstration": " "}, r"d.jsonl:2: field 'demonstration'"),
        ({"prompt": "p", "demonstration": "d", "negative": 1}, r"d.jsonl:2: field 'negative'"),
        ("{not json", r"d.jsonl:2: invalid JSON"),
        ("[1, 2]", r"d.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_data_line_names_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "demonstration": "ok"}, line])
    with pytest.raises(DataError, match=message):
        load_jsonl(path)


def test_a_missing_field_names_the_unknown_keys_of_its_line(tmp_path):
    line = {"prompt": "p", "demonstraton": "d", "id": 3}
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "demonstration": "ok"}, line])
    message = (
        r"d.jsonl:2: missing field 'demonstration'; unknown keys on the line: 'demonstraton' "
        r"\(did you mean 'demonstration'\?\), 'id'; the fields are prompt, demonstration"
    )
    with pytest.raises(DataError, match=message):
        load_jsonl(path)


def test_missing_and_empty_data_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no example"):
        load_jsonl(write_jsonl(tmp_path / "e.jsonl", [""]))


def test_load_task_holds_out_eval_and_resolves_builtin(tmp_path):
    records = [{"prompt": f"p{i}", "demonstration": f"d{i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    task = load_task(str(path), None, 3, seed=0)
    assert len(task.train) == 7 and len(task.eval) == 3
    assert {e.prompt for e in task.train} | {e.prompt for e in task.eval} == {
        f"p{i}" for i in range(10)
    }
    with pytest.raises(DataError, match="eval_size=10"):
        load_task(str(path), None, 10, seed=0)
    default = load_task("builtin", None, 16, seed=0)
    assert default.name == data.BUILTIN_TASKS[data.DEFAULT_BUILTIN](0).name
    assert all(e.negative for e in default.train)
    with pytest.raises(DataError, match="unknown builtin task 'nope'"):
        load_task("builtin:nope", None, 16, seed=0)


def test_builtin_hook_can_register_a_task(monkeypatch):
    task = data.Task(name="mine", train=[Example("a", "b")] * 5, eval=[])
    monkeypatch.setitem(data.BUILTIN_TASKS, "mine", lambda seed: task)
    monkeypatch.setattr(data, "DEFAULT_BUILTIN", "mine")
    assert load_task("builtin", None, 16, seed=0) is task


def test_templates_put_the_prompt_last_and_exclude_own_demonstration():
    t = PromptTemplates()
    teacher = t.teacher_text("Q: 1+1=?\nA: ", "1+1=2")
    assert "1+1=2" in teacher and teacher.endswith("Q: 1+1=?\nA: ")
    view = t.view_text("Q: 1+1=?\nA: ", [("Q: 2+2=?\nA: ", "2+2=4")])
    assert view.startswith("Reference samples (do not solve these)")
    assert "2+2=4" in view and "1+1=2" not in view and view.endswith("Q: 1+1=?\nA: ")


def test_prompt_encoder_without_chat_template():
    tok = build_tokenizer()
    enc = PromptEncoder(tok)
    assert not enc.chat
    assert tok.decode(enc("abc")) == "abc"
    assert enc.completion("xy", tok.eos_token_id)[-1] == tok.eos_token_id


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="lr must be float"):
        TrainConfig(lr="fast")
    with pytest.raises(ConfigError, match="method must be one of"):
        TrainConfig(method="magic")
    with pytest.raises(ConfigError, match="jsd_alpha must lie in the open interval"):
        TrainConfig(divergence="jsd", jsd_alpha=1.0)
    with pytest.raises(ConfigError, match="max_steps must be int"):
        TrainConfig(max_steps=2.5)
    assert TrainConfig(lr=1).lr == 1.0


def test_the_loss_config_is_built_once_with_the_config():
    cfg = TrainConfig(method="sd", clip=5.0)
    assert cfg.loss_config() is cfg.loss_config() and cfg.loss_config().clip == 5.0
    assert cfg.replace(clip=2.0).loss_config().clip == 2.0 and cfg.loss_config().clip == 5.0
    assert TrainConfig(method="sft").loss_config() is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.clip = 1.0  # what was checked is what runs
    assert "_loss" not in cfg.to_dict() and cfg == TrainConfig(method="sd", clip=5.0)


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: sd\nlr: 0.001\nbatch_size: 2\n")
    cfg = parse_args(["--config", str(path), "--batch-size", "3", "--agreement", "--clip", "none"])
    assert (cfg.method, cfg.lr, cfg.batch_size, cfg.agreement, cfg.clip) == (
        "sd",
        0.001,
        3,
        "token",
        None,
    )
    assert cfg.loss_config().agreement == "token"
    (tmp_path / "c.json").write_text(json.dumps({"method": "gkd", "lora_r": 0}))
    cfg = parse_args(["--config", str(tmp_path / "c.json"), "--agreement", "none"])
    assert cfg.loss_config().divergence == "jsd" and cfg.agreement == "none"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lerning_rate: 0.1\n", "unknown config key 'lerning_rate'"),
        ("batch_size: two\n", "batch_size must be int"),
        ("- 1\n", "must hold a mapping"),
        ("a: [\n", "cannot be parsed"),
    ],
)
def test_bad_config_file_names_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(path)])


def test_bad_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--method", "magic"])
    assert "--method" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "expect"),
    [
        ("sd", dict(divergence="fkl", agreement="none", ema=None)),
        ("gkd", dict(divergence="jsd", ema=None)),
        ("ema", dict(divergence="fkl", ema=(0.9, 10))),
        (
            "unisd_star",
            dict(agreement="token", contrastive_weight=0.01, feature_weight=0.01, ema=(0.98, 10)),
        ),
        ("match_repr", dict(kd_weight=0.0, feature_weight=1.0, ema=None)),
    ],
)
def test_method_defaults(method, expect):
    cfg = TrainConfig(method=method)
    loss = cfg.loss_config()
    assert cfg.ema_settings() == expect.pop("ema")
    for key, value in expect.items():
        assert getattr(loss, key) == value


def test_mechanism_flags_override_the_method():
    cfg = TrainConfig(method="unisd_star", ema_beta=0.0, contrastive_weight=0.0, clip=5.0)
    loss = cfg.loss_config()
    assert cfg.ema_settings() is None
    assert not loss.needs_negative and loss.clip == 5.0 and loss.needs_views
    assert TrainConfig(method="sd", ema_beta=0.5, ema_every=3).ema_settings() == (0.5, 3)


def test_shipped_config_files_load():
    from pathlib import Path

    from unisd_fast.train.config import DEFAULT_CONFIG, load_config

    root = Path(__file__).resolve().parents[2]
    files = [DEFAULT_CONFIG, *sorted((root / "configs").glob("*.yaml"))]
    assert len(files) >= 2
    for path in files:
        assert load_config(path).method == "unisd_star", path
