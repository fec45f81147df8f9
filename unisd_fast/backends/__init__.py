"""Backends: the row passes the fused losses are built from (docs/kernels.md).

``protocol`` (the ``RowBackend`` interface), ``choice`` (the one place a backend is chosen),
``pytorch`` (the PyTorch passes, the CPU path), ``triton`` (the Triton kernels) and
``stable`` (the cancellation-free forms). Backends import nothing of the autograd layer
(``unisd_fast.ops``) or of the API modules.
"""
