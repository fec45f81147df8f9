"""The training loop on the tiny model: every method, resume, the CLI."""

import json

import pytest
import torch

from unisd_fast.train import main, run
from unisd_fast.train.config import METHODS, TrainConfig

pytest.importorskip("peft")

FAST = dict(
    max_new_tokens=6,
    batch_size=2,
    tiny_hidden_size=32,
    eval_at_start=False,
    eval_teacher=False,
    save_final_model=False,
    progress=False,
    lr=1e-3,
)


def records(path, kind):
    lines = (json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r["kind"] == kind]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(tmp_path, method):
    cfg = TrainConfig(method=method, max_steps=2, output_dir=str(tmp_path), **FAST)
    summary = run(cfg)
    train = records(tmp_path, "train")
    assert [r["step"] for r in train] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert summary["step"] == 2 and summary["train"] == train[-1]
    assert {"accuracy", "retention_ppl", "kl_base"} <= set(summary["eval"])
    assert summary["checkpoint"].endswith("checkpoint-000002")
    if method not in ("sft",):
        assert {"kd", "contrastive", "feature", "mean_weight", "clipped_frac"} <= set(train[0])
    if method in ("agreement", "unisd_star"):
        assert 0 < train[0]["mean_weight"] <= 1


def test_full_finetuning_with_ema_and_clip_moves_the_model(tmp_path):
    cfg = TrainConfig(
        method="ema",
        lora_r=0,
        ema_every=1,
        clip_quantile=0.5,
        max_steps=2,
        output_dir=str(tmp_path),
        **{**FAST, "eval_teacher": True, "save_final_model": True},
    )
    summary = run(cfg)
    train = records(tmp_path, "train")
    assert all(r["ema_updated"] for r in train)
    assert train[0]["clipped_frac"] > 0
    assert summary["eval"]["kl_base"] > 0 and "teacher_accuracy" in summary["eval"]
    assert (tmp_path / "final_model" / "config.json").is_file()


@pytest.mark.parametrize(
    "changes",
    [
        dict(method="unisd_star", ema_every=1, grad_accum=2),
        dict(method="sd", lora_r=0, lora_dropout=0.0, eval_every=1),
    ],
    ids=["unisd_star-lora", "sd-full"],
)
def test_resume_matches_an_uninterrupted_run(tmp_path, changes):
    whole = TrainConfig(
        max_steps=4,
        save_every=2,
        keep_checkpoints=3,
        output_dir=str(tmp_path / "a"),
        **FAST,
        **changes,
    )
    run(whole)
    resumed = whole.replace(
        output_dir=str(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoint-000002")
    )
    summary = run(resumed)
    assert summary["step"] == 4
    for kind in ("train", "eval"):
        a, b = records(tmp_path / "a", kind), records(tmp_path / "b", kind)
        for ra, rb in zip(a, b, strict=True):
            timing = {"tokens_per_s", "step_time_s", "peak_mem_mb"}
            exact = {k: v for k, v in ra.items() if isinstance(v, (str, bool))}
            assert exact == {k: rb[k] for k in exact}
            close = {k: v for k, v in ra.items() if k not in timing and k not in exact}
            assert {k: rb[k] for k in close} == pytest.approx(close, rel=1e-5, abs=1e-7)
    state_a = torch.load(tmp_path / "a" / "checkpoint-000004" / "state.pt", weights_only=False)
    state_b = torch.load(tmp_path / "b" / "checkpoint-000004" / "state.pt", weights_only=False)
    for name, value in state_a["student"].items():
        torch.testing.assert_close(state_b["student"][name], value)


def test_checkpoints_are_pruned_and_cli_resumes(tmp_path, capsys, monkeypatch):
    out = str(tmp_path)
    args = [
        "--data",
        "builtin:arithmetic",
        "--method",
        "sd",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--tiny-hidden-size",
        "32",
        "--no-eval-at-start",
        "--no-eval-teacher",
        "--no-progress",
        "--no-save-final-model",
        "--output-dir",
        out,
        "--save-every",
        "1",
        "--keep-checkpoints",
        "2",
    ]
    assert main([*args, "--max-steps", "3"]) == 0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-000002",
        "checkpoint-000003",
    ]
    assert not list(tmp_path.glob(".tmp-*"))
    saved = json.loads((tmp_path / "checkpoint-000003" / "config.json").read_text())
    assert saved["method"] == "sd" and saved["max_steps"] == 3
    capsys.readouterr()
    assert main(["--resume", "--output-dir", out, "--max-steps", "4", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 4
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2, 3, 4]
    monkeypatch.setenv("RANK", "1")  # a torchrun rank other than 0 prints no summary
    assert main(["--resume", "--output-dir", out, "--max-steps", "5", "--no-progress"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_reports_bad_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("max_stepz: 3\n")
    assert main(["--config", str(path)]) == 2
    assert "unknown config key 'max_stepz'" in capsys.readouterr().err
    assert main(["--resume", "--output-dir", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bad_data_file_is_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "demonstration": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: missing field 'demonstration'"):
        run(TrainConfig(data=str(path), output_dir=str(tmp_path / "o"), **FAST))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_local_pretrained_model_path(tmp_path, arch):
    from unisd_fast.train.models.tiny import build_tiny_model, build_tokenizer, load_tokenizer

    tokenizer = build_tokenizer()
    build_tiny_model(tokenizer, hidden_size=32, arch=arch).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    text = "#zok=47\nzok="
    assert load_tokenizer(str(tmp_path / "base"))(text).input_ids == tokenizer(text).input_ids
    out = str(tmp_path / "o")
    base = str(tmp_path / "base")
    cfg = TrainConfig(model=base, method="sd", max_steps=1, output_dir=out, **FAST)
    assert run(cfg)["step"] == 1


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, capsys):
    (tmp_path / "checkpoint-000003").mkdir()
    assert main(["--output-dir", str(tmp_path), "--no-progress"]) == 2
    assert "already holds checkpoints (checkpoint-000003)" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "demonstration": "b"}\n{"demonstration": "b"}\n')
    args = ["--output-dir", str(tmp_path), "--overwrite", "--data", str(data), "--no-progress"]
    assert main(args) == 2
    assert "d.jsonl:2: missing field 'prompt'" in capsys.readouterr().err
    assert (tmp_path / "checkpoint-000003").exists()  # data errors come before any deletion


def test_schedule_order_and_view_references_are_seeded():
    from unisd_fast.train.data import Schedule

    cfg = TrainConfig(batch_size=3, grad_accum=2, seed=7)
    a, b = Schedule(10, cfg), Schedule(10, cfg)
    first_epoch = [a.index(p) for p in range(10)]
    assert sorted(first_epoch) == list(range(10))
    assert [a.index(p) for p in range(10, 20)] != first_epoch
    assert a.positions(1, 1) == [9, 10, 11]
    for pos in range(40):
        own = a.index(pos)
        refs = a.references(pos, own, 3)
        assert len(set(refs)) == 3 and own not in refs and all(0 <= r < 10 for r in refs)
        assert refs == b.references(pos, own, 3)
    with pytest.raises(ValueError, match="3 views need more than 3 training examples"):
        Schedule(3, cfg).references(0, 0, 3)


@pytest.mark.slow
def test_self_distillation_reduces_the_divergence(tmp_path):
    changes = dict(lr=3e-3, tiny_hidden_size=64, batch_size=4, max_new_tokens=8)
    cfg = TrainConfig(
        method="sd", lora_r=0, max_steps=30, output_dir=str(tmp_path), **{**FAST, **changes}
    )
    run(cfg)
    kd = [r["kd"] for r in records(tmp_path, "train")]
    assert sum(kd[-5:]) < 0.5 * sum(kd[:5])
