"""Benchmarks of the UniSD loss: eager PyTorch, torch.compile, unisd_fast and Liger-Kernel.

Run from the repository root: ``python -m benchmarks --help`` (sweep runner) or
``pytest benchmarks`` (pytest-benchmark suite). See benchmarks/README.md.
"""
