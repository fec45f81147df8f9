"""benchmarks/gpu_check.sh: its plan (every step with its budget, inside the 8-minute limit
of a lent GPU) and, slow, its CPU dry run (every step end to end at tiny shapes, each step's
files in $OUT, exit status 0)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ("exactness", "tests", "kernels", "headline", "linear")


def run(tmp_path, **env):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=900)


def test_plan_lists_every_step_within_the_deadline(tmp_path):
    done = run(tmp_path, PLAN="1")
    assert done.returncode == 0, done.stdout + done.stderr
    budgets = dict(re.findall(r"=== (\w+): budget (\d+)s", done.stdout))
    assert tuple(budgets) == STEPS
    deadline = int(re.search(r"deadline (\d+)s", done.stdout).group(1))
    assert sum(map(int, budgets.values())) <= deadline <= 480
    assert "--tokens 8192 --vocab 151936 --dtype bf16" in done.stdout
    assert "--hidden 3584 --vocab 152064" in done.stdout


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    done = run(tmp_path, DRY_RUN="1")
    assert done.returncode == 0, done.stdout[-3000:]
    for name in STEPS:
        assert (tmp_path / f"{name}.log").exists(), name
    for path in ("exactness/exactness.md", "kernels/kernels.md", "headline/results.csv",
                 "linear/table.md"):
        assert (tmp_path / path).exists(), path
    assert "all steps passed" in done.stdout


def test_a_failing_step_fails_the_check(tmp_path):
    # a deadline too short for any step: every step is skipped and reported, exit 1
    done = run(tmp_path, DRY_RUN="1", DEADLINE="5")
    assert done.returncode == 1
    assert done.stdout.count("skipped: under 10 s left") == len(STEPS)
    assert "FAILED: exactness (skipped)" in done.stdout
