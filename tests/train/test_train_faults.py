"""Faults and bad input of the trainer: non-finite steps, long prompts, the output lock,
resume, corrupt checkpoints, and errors reported before any model is built."""

import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch

from unisd_fast.config import UniSDConfig
from unisd_fast.train import loop, main, run, step
from unisd_fast.train.config import TrainConfig, parse_args
from unisd_fast.train.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    OutputDirLocked,
    TrainingDiverged,
)
from unisd_fast.train.lock import LOCK_NAME
from unisd_fast.train.tasks import load_jsonl

TINY = dict(
    method="sft",
    lora_r=0,
    tiny_hidden_size=32,
    tiny_layers=1,
    batch_size=2,
    max_new_tokens=2,
    lr=1e-3,
    warmup_ratio=0.0,
    eval_at_start=False,
    eval_teacher=False,
    save_final_model=False,
    progress=False,
)


def write_data(path, n, long_prompt=None):
    rows = [{"prompt": f"k{i}=", "demonstration": f"{i % 10}", "negative": "x"} for i in range(n)]
    if long_prompt is not None:
        rows.append({"prompt": long_prompt, "demonstration": "1"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def data(tmp_path):
    train, held_out = write_data(tmp_path / "d.jsonl", 8), write_data(tmp_path / "e.jsonl", 2)
    return dict(data=train, eval_data=held_out)


def records(out, kind="train"):
    lines = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r["kind"] == kind]


def student_state(checkpoint):
    return torch.load(checkpoint / "state.pt", weights_only=False)["student"]


def poison_steps(monkeypatch, steps, what):
    """Make the given (1-based) steps' gradient or loss NaN."""
    original, calls = step.sft_micro, []

    def micro(ctx, setup, batch, norm):
        stats = original(ctx, setup, batch, norm)
        calls.append(None)
        if len(calls) in steps:
            if what == "gradient":
                for p in ctx.student.parameters():
                    p.grad.fill_(float("nan"))
            else:
                stats["loss"] = float("nan")
        return stats

    monkeypatch.setattr(step, "sft_micro", micro)


def no_model(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("a model was built before the error was found")

    monkeypatch.setattr(loop, "load_model", load_model)


@pytest.mark.parametrize("what", ["gradient", "loss"])
def test_a_nonfinite_step_is_skipped_and_counted(tmp_path, data, monkeypatch, what):
    poison_steps(monkeypatch, {2}, what)
    out = tmp_path / "o"
    cfg = TrainConfig(
        max_steps=3, save_every=1, keep_checkpoints=3, output_dir=str(out), **data, **TINY
    )
    run(cfg)
    train = records(out)
    assert [r["skipped"] for r in train] == [False, True, False]
    assert [r["nonfinite"] for r in train] == ["none", what, "none"]
    assert [r["skipped_steps"] for r in train] == [0, 1, 1]
    one, two, three = (student_state(out / f"checkpoint-00000{i}") for i in (1, 2, 3))
    for name, value in one.items():
        assert torch.equal(two[name], value), name  # step 2 applied no update
        assert torch.isfinite(three[name]).all()
    assert any(not torch.equal(three[n], one[n]) for n in one)


def test_repeated_nonfinite_steps_stop_the_run(tmp_path, data, monkeypatch, capsys):
    poison_steps(monkeypatch, set(range(1, 10)), "gradient")
    out = tmp_path / "o"
    args = ["--output-dir", str(out), "--max-steps", "6", "--max-bad-steps", "2"]
    args += ["--data", data["data"], "--eval-data", data["eval_data"], "--save-every", "1"]
    args += ["--method", "sft", "--lora-r", "0", "--tiny-hidden-size", "32", "--tiny-layers", "1"]
    args += ["--batch-size", "2", "--max-new-tokens", "2", "--no-eval-at-start", "--no-progress"]
    assert main([*args, "--no-eval-teacher", "--no-save-final-model"]) == 1
    assert "2 steps in a row had a non-finite gradient" in capsys.readouterr().err
    assert [r["step"] for r in records(out)] == [1, 2]
    for checkpoint in out.glob("checkpoint-*"):
        assert all(torch.isfinite(v).all() for v in student_state(checkpoint).values())


def test_nonfinite_weights_are_never_saved(tmp_path, data, monkeypatch):
    class Poisoned(torch.optim.AdamW):
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    monkeypatch.setattr(torch.optim, "AdamW", Poisoned)
    out = tmp_path / "o"
    cfg = TrainConfig(max_steps=2, save_every=1, output_dir=str(out), **data, **TINY)
    with pytest.raises(TrainingDiverged, match="the student at step 1 holds non-finite"):
        run(cfg)
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".tmp-*"))


def test_zero_gradient_for_many_steps_warns(tmp_path, data, monkeypatch, caplog):
    original = step.sft_micro

    def micro(ctx, setup, batch, norm):
        stats = original(ctx, setup, batch, norm)
        for p in ctx.student.parameters():
            p.grad.zero_()
        return stats

    monkeypatch.setattr(step, "sft_micro", micro)
    cfg = TrainConfig(max_steps=5, output_dir=str(tmp_path / "o"), **data, **TINY)
    with caplog.at_level(logging.WARNING, logger="unisd_fast.train"):
        run(cfg)
    assert "gradient norm has been exactly 0 for 5 steps" in caplog.text


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(dtype="float16", lora_r=0), "float16 with full fine-tuning"),
        (dict(lr=float("inf")), "lr must be finite"),
        (dict(lr=float("nan")), "lr must be finite"),
        (dict(max_grad_norm=float("inf")), "max_grad_norm must be finite"),
        (dict(method="sft", clip=5.0), "method sft .* got --clip"),
        (dict(method="sft", ema_beta=0.9), "method sft .* got --ema-beta"),
        (dict(resume="latest", overwrite=True), "resume and overwrite exclude each other"),
        (dict(max_bad_steps=0), "max_bad_steps must be >= 1"),
    ],
)
def test_bad_combinations_are_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_float16_with_lora_and_cli_flags_still_accepted(capsys):
    assert TrainConfig(dtype="float16", lora_r=8).dtype == "float16"
    with pytest.raises(ConfigError, match="lr must be finite"):
        parse_args(["--lr", "inf"])


def test_every_loss_option_is_a_flag_and_a_config_key(tmp_path):
    names = [f.name for f in dataclasses.fields(UniSDConfig)]
    cfg = parse_args(
        ["--method", "agreement", "--agreement-quantile", "0.5", "--agreement-cap", "3",
         "--agreement-floor", "0.1", "--agreement-stat", "range", "--ignore-index", "-1"]
    )
    loss = cfg.loss_config()
    assert (loss.agreement_quantile, loss.agreement_cap, loss.agreement_floor) == (0.5, 3.0, 0.1)
    assert (loss.agreement_stat, loss.ignore_index, loss.agreement) == ("range", -1, "token")
    assert loss.agreement_gamma == UniSDConfig.preset("agreement").agreement_gamma
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{n}: null\n" for n in names) + "agreement_stat: range\n")
    assert parse_args(["--config", str(path)]).loss_config().agreement_stat == "range"
    assert all(hasattr(TrainConfig(), n) for n in names)


def test_long_eval_prompts_are_dropped_before_generation(tmp_path, monkeypatch, caplog):
    from unisd_fast.train import evaluate

    original, longest = evaluate.generate, []

    def generate(model, prompts, gen_config, device):
        longest.append(max(len(p) for p in prompts))
        return original(model, prompts, gen_config, device)

    monkeypatch.setattr(evaluate, "generate", generate)
    eval_data = write_data(tmp_path / "e.jsonl", 2, long_prompt="q" * 3000)
    cfg = TrainConfig(
        data=write_data(tmp_path / "d.jsonl", 8),
        eval_data=eval_data,
        max_prompt_tokens=200,
        max_steps=1,
        output_dir=str(tmp_path / "o"),
        **{**TINY, "eval_teacher": True},
    )
    with caplog.at_level(logging.WARNING, logger="unisd_fast.train"):
        summary = run(cfg)
    assert longest and max(longest) <= 200
    assert "dropped 1 evaluation examples" in caplog.text
    assert "accuracy" in summary["eval"]


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path, data, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".tmp-checkpoint-000002-4242").mkdir()  # left by a killed run
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / LOCK_NAME).write_text(f"{other.pid}\n")
        cfg = TrainConfig(max_steps=1, output_dir=str(out), **data, **TINY)
        with pytest.raises(OutputDirLocked, match=f"in use by another run \\(pid {other.pid}"):
            run(cfg)
        assert main(["--output-dir", str(out), "--data", data["data"], "--no-progress"]) == 2
        assert f"pid {other.pid}" in capsys.readouterr().err
        assert (out / ".tmp-checkpoint-000002-4242").is_dir()
    finally:
        other.kill()
        other.wait()
    run(cfg)  # the lock of a process that no longer runs is taken over
    assert not (out / LOCK_NAME).exists()
    assert not list(out.glob(".tmp-*"))


@pytest.fixture
def saved_run(tmp_path, data):
    cfg = TrainConfig(max_steps=2, output_dir=str(tmp_path / "o"), **data, **TINY)
    run(cfg)
    return cfg


def test_resume_with_more_steps_continues_the_schedule(saved_run, tmp_path):
    summary = run(saved_run.replace(resume="latest", max_steps=4))
    train = records(tmp_path / "o")
    assert summary["step"] == 4 and [r["step"] for r in train] == [1, 2, 3, 4]
    # cosine without warmup over 4 steps: the third step runs at half the peak rate
    assert train[2]["lr"] == pytest.approx(0.5 * saved_run.lr)
    assert train[3]["lr"] == pytest.approx(0.5 * (1 - 0.5**0.5) * saved_run.lr)


def test_resume_refuses_another_method_before_building_a_model(saved_run, monkeypatch):
    no_model(monkeypatch)
    changed = saved_run.replace(resume="latest", method="sd", max_steps=3)
    with pytest.raises(CheckpointError, match=r"differs in: method 'sft' -> 'sd'"):
        run(changed)
    with pytest.raises(CheckpointError, match=r"lora_r 0 -> 4"):
        run(saved_run.replace(resume="latest", lora_r=4, max_steps=3))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: (c / "state.pt").write_bytes(b""), r"state\.pt' is missing or empty"),
        (lambda c: (c / "state.pt").write_bytes(b"PK\x03\x04 junk"), r"state\.pt' cannot be read"),
        (lambda c: (c / "config.json").write_text("{broken"), r"config\.json' cannot be read"),
    ],
    ids=["empty-state", "garbage-state", "broken-config"],
)
def test_corrupt_checkpoint_is_a_clear_error(saved_run, tmp_path, capsys, damage, message):
    checkpoint = tmp_path / "o" / "checkpoint-000002"
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        run(saved_run.replace(resume="latest", max_steps=3))
    assert main(["--resume", "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    assert str(checkpoint) in capsys.readouterr().err


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "demonstration": "b"}\n{"prompt": "\xff", "x": 1}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8 \(byte 0xff at column 13\)"):
        load_jsonl(path)


def test_errors_come_before_any_model_is_built(tmp_path, data, monkeypatch):
    no_model(monkeypatch)
    out = str(tmp_path / "o")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "demonstration": "\xfe"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: not valid UTF-8"):
        run(TrainConfig(data=str(bad), output_dir=out, **TINY))
    three = write_data(tmp_path / "three.jsonl", 3)
    cfg = TrainConfig(**{**TINY, "method": "agreement"}, data=three, eval_data=three)
    cfg = cfg.replace(output_dir=out)
    with pytest.raises(DataError, match="3 teacher views need more than 3 training examples"):
        run(cfg)
    elsewhere = tmp_path / "untouched"
    with pytest.raises(ConfigError, match="device 'nope' is not a torch device"):
        run(TrainConfig(device="nope", output_dir=str(elsewhere), **data, **TINY))
    assert not elsewhere.exists()  # checked before the output folder is locked
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            run(TrainConfig(device="cuda", output_dir=out, **data, **TINY))
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ConfigError, match="loss_impl 'triton' needs a CUDA device"):
            cfg = TrainConfig(**{**TINY, "method": "sd"}, loss_impl="triton", output_dir=out)
            run(cfg.replace(**data))


def test_missing_train_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main([]) == 1
    assert 'pip install "unisd-fast[train]"' in capsys.readouterr().err
