"""Run a script in a fresh interpreter with the compiled CPU path on: UNISD_FAST_COMPILE=1
(the suite itself runs eagerly), through torch.compile in the process (UNISD_FAST_AOT=0
unless given: tests/test_aot.py runs the ahead-of-time builds) and no Triton interpreter,
from this folder so that the script imports the test helpers."""

import os
import subprocess
import sys
from pathlib import Path


def run_compiled(script: str, *args: str, **env: str) -> str:
    """The script's stdout; its stderr's tail as the failure message if it exits non-zero
    (past the time limit, tests/conftest.py reports it in one line). ``env`` adds variables
    to the child's environment."""
    child_env = {**os.environ, "UNISD_FAST_COMPILE": "1", "UNISD_FAST_AOT": "0", **env}
    child_env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=Path(__file__).parent,
                          env=child_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
