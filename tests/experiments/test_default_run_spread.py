"""The default run's spread harness: its plan, its commands, its table and its resumption."""

import json

from experiments import default_run_spread as spread
from experiments.default_run_spread import Job


def test_plan_runs_every_seed_then_the_variants_once_each():
    jobs = spread.plan([0, 1, 42], 1, [42, 0], [1, 2, 4])
    assert jobs == [
        Job(0, 1, False),
        Job(1, 1, False),
        Job(42, 1, False),
        Job(42, 1, True),
        Job(0, 1, True),
        Job(42, 2, False),
        Job(0, 2, False),
        Job(42, 4, False),
        Job(0, 4, False),
    ]


def test_command_is_the_default_run_with_its_seed_folder_and_flag(tmp_path):
    cmd = spread.command(Job(3, 4, True), tmp_path)
    assert cmd[1:] == [
        "-m",
        "unisd_fast.train",
        "--overwrite",
        "--no-progress",
        "--seed",
        "3",
        "--output-dir",
        str(tmp_path / "seed3-t4-det"),
        "--deterministic",
    ]
    assert "--deterministic" not in spread.command(Job(3, 4, False), tmp_path)


def record(seed, threads, det, student, teacher, steps):
    return {
        "seed": seed,
        "threads": threads,
        "deterministic": det,
        "student": student,
        "teacher": teacher,
        "student_before": 0.0,
        "retention_ppl": 2.0 + seed,
        "kl_base": 0.5,
        "pretrain_steps": steps,
        "pretrain_reached": steps < 4000,
        "pretrain_s": 30.0,
        "wall_s": 100.0 + seed,
        "omp_wait_policy": "default",
        "load_before": 1.0,
        "load_after": 2.0,
    }


def test_table_has_a_row_per_run_and_the_spread_over_all():
    records = [
        record(0, 2, False, 0.875, 0.953125, 300),
        record(1, 2, False, 1.0, 1.0, 200),
        record(2, 4, True, 0.96875, 1.0, 4000),
    ]
    text = spread.spread_table(records, "unisd-train")
    assert "| seed2-t4-det | 2 | 4 | on | 96.9% | 100.0% |" in text
    assert "| student | 87.5% | 96.9% | 100.0% |" in text
    assert "| teacher | 95.3% | 100.0% | 100.0% |" in text
    assert "| pre-train steps | 200 | 300 | 4000 |" in text
    assert "missed its copying target on 1 run(s)" in text


def test_main_resumes_from_the_recorded_runs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.jsonl").write_text(json.dumps(record(0, 2, False, 1.0, 1.0, 200)) + "\n")
    ran = []

    def fake_run(job, work_dir):
        ran.append(job)
        return record(job.seed, job.threads, job.deterministic, 0.5, 1.0, 300)

    monkeypatch.setattr(spread, "run_job", fake_run)
    args = ["--output", str(out), "--seeds", "0,1", "--threads", "2", "--variant-seeds", "1"]
    assert spread.main([*args, "--variant-threads", "1"]) == 0
    assert ran == [Job(1, 2, False), Job(1, 2, True), Job(1, 1, False)]
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "| seed1-t2-det |" in (out / "spread.md").read_text()
    ran.clear()
    assert spread.main([*args, "--variant-threads", "1,3", "--workers", "2"]) == 0
    assert ran == [Job(1, 3, False)] and "2 at a time" in (out / "spread.md").read_text()


def test_run_job_starts_from_an_empty_folder_with_its_thread_count(tmp_path, monkeypatch):
    job = Job(5, 4, False)
    folder = tmp_path / job.name
    (folder / "base_model").mkdir(parents=True)
    (folder / "base_model" / "stale").write_text("a cached base from an earlier spread")
    seen = {}

    def fake_run(cmd, env, capture_output, text):
        seen.update(cmd=cmd, threads=(env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]))
        seen["fresh"] = not folder.exists()
        (folder / "base_model").mkdir(parents=True)
        pretrain = {"steps": 300, "reached": True, "seconds": 40.0, "copy": 1.0}
        (folder / "base_model" / "pretrain.json").write_text(json.dumps(pretrain))
        evals = {"accuracy": 0.75, "teacher_accuracy": 1.0, "retention_ppl": 3.0, "kl_base": 1.0}
        summary = {"step": 400, "eval": evals, "first_eval": {**evals, "accuracy": 0.0}}
        return spread.subprocess.CompletedProcess(cmd, 0, json.dumps(summary), "")

    monkeypatch.setattr(spread.subprocess, "run", fake_run)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    got = spread.run_job(job, tmp_path)
    assert seen["fresh"] and seen["threads"] == ("4", "4") and seen["cmd"][-1] == str(folder)
    assert (got["student"], got["teacher"], got["student_before"]) == (0.75, 1.0, 0.0)
    assert (got["pretrain_steps"], got["steps"], got["seed"], got["threads"]) == (300, 400, 5, 4)
    assert got["omp_wait_policy"] == "default"
