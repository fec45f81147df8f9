"""Experiments on the trainer, run from the repository root (``python -m experiments.NAME``);
not part of the installed package."""
