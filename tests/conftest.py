"""Test set-up: Triton's interpreter when CUDA is absent (set before any kernel import), the
eager CPU path unless a test compiles on purpose, a fixed seed for every test."""

import os

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
