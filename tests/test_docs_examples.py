"""Every ```python block of README.md and docs/*.md runs as written: each alone, in a fresh
interpreter, from a scratch folder with the repository on the path (signatures and other
listings are fenced as ```text). The CPU path runs eagerly here (UNISD_FAST_COMPILE=0) to
keep the suite short; the code is the same."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def blocks():
    found = []
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append(pytest.param(match.group(1), id=f"{path.name}:{line}"))
    return found


def test_the_documents_hold_examples():
    assert len(blocks()) >= 5


@pytest.mark.parametrize("code", blocks())
def test_example_runs(code, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "UNISD_FAST_COMPILE": "0", "TRL_EXPERIMENTAL_SILENCE": "1"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
