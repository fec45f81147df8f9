"""unisd-fast: fused, exact UniSD self-distillation losses for LLMs.

The public names load on first use (PEP 562), so that ``unisd_fast.config`` (the options and
constants, no torch) can be imported alone: the trainer's command line reads its arguments
before torch is imported.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "IMPLS": ".config",
    "PRESETS": ".config",
    "UniSDConfig": ".config",
    "VocabParallel": ".vocab_parallel",
    "LinearHead": ".ops.head",
    "resolve_impl": ".backends.choice",
    "ViewSelection": ".ops.coverage",
    "select_view_rows": ".ops.coverage",
    "UniSDLinearLoss": ".linear",
    "unisd_linear_loss": ".linear",
    "UniSDLoss": ".losses",
    "UniSDOutput": ".losses",
    "label_logprobs": ".losses",
    "unisd_loss": ".losses",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
