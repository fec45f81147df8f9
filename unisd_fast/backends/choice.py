"""The one place a backend is chosen: ``impl`` and the device of the tensors -> the name of
an implementation, and a name -> its ``RowBackend``.

``impl`` is one of ``config.IMPLS`` or a ``RowBackend`` instance (a backend with settings of
its own, e.g. ``TorchBackend(small_elements=0)``). A given instance is known by a name of its
own (``given:<id>``, held weakly while the caller holds it), so that the fused-linear
operator, whose arguments are plain values, can carry it.
"""

from __future__ import annotations

import os
import weakref

import torch

from ..config import IMPLS
from .protocol import RowBackend

_GIVEN: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def check_impl(impl):
    """``impl`` itself when it is one of IMPLS or a RowBackend, else a clear error."""
    if isinstance(impl, str):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS} or a RowBackend, got {impl!r}")
        return impl
    if not isinstance(impl, RowBackend):
        raise TypeError(f"impl must be one of {IMPLS} or a RowBackend, got "
                        f"{type(impl).__name__}")
    return impl


def triton_available_for(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def kernels_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's interpreter. Triton settles this when it
    decorates the kernels, at their import, from TRITON_INTERPRET at that moment."""
    import triton

    from .triton import common

    return not isinstance(common.row_offset, triton.runtime.JITFunction)


def resolve_impl(impl, device: torch.device) -> str:
    """The implementation ``impl`` runs as on ``device``: "reference", "torch", "triton" or
    the name of a given backend. A RuntimeError where Triton cannot run these tensors."""
    check_impl(impl)
    if not isinstance(impl, str):
        name = f"given:{id(impl)}"
        _GIVEN[name] = impl
        return name
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and not triton_available_for(device):
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (got {device.type}); on CPU set "
            "TRITON_INTERPRET=1 before importing unisd_fast, or use impl='torch'"
        )
    if impl == "triton" and device.type == "cpu" and not kernels_interpreted():
        raise RuntimeError(
            "impl='triton' on CPU tensors: TRITON_INTERPRET=1 was set after the Triton "
            "kernels were imported, so they were built for a GPU; set TRITON_INTERPRET=1 "
            "before importing unisd_fast, or use impl='torch'"
        )
    return impl


def backend_named(name: str) -> RowBackend:
    """The backend of a name ``resolve_impl`` returned (other than "reference")."""
    if name == "torch":
        from .pytorch import default_backend

        return default_backend()
    if name == "triton":
        from .triton import default_backend

        return default_backend()
    return _GIVEN[name]
