"""Test set-up: Triton's interpreter when CUDA is absent (set before any kernel import), the
eager CPU path unless a test compiles on purpose, a fixed seed for every test, and a
subprocess that runs past its time limit reported in one line."""

import os
import subprocess

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("UNISD_FAST_COMPILE", "0")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return DEVICE


def _command(cmd) -> str:
    """A subprocess's command without the script text it may carry (python -c SCRIPT)."""
    words = [str(w) for w in (cmd if isinstance(cmd, (list, tuple)) else [cmd])]
    if "-c" in words[:-1]:
        at = words.index("-c")
        lines = words[at + 1].count("\n") + 1
        words = [*words[:at + 1], f"<script of {lines} lines>", *words[at + 2:]]
    return " ".join(os.path.basename(w) if i == 0 else w for i, w in enumerate(words))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except subprocess.TimeoutExpired as error:
        timeout = error
    pytest.fail(f"timed out: a subprocess ran past its {timeout.timeout:.0f} s limit "
                f"({_command(timeout.cmd)})", pytrace=False)
