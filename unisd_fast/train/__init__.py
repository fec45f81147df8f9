"""The UniSD trainer (extra ``[train]``): on-policy self-distillation of a causal LM.

``run(cfg)`` trains from a :class:`TrainConfig` (``load_config(path)`` reads one from a YAML
or JSON file); ``main(argv)`` is the ``unisd-train`` command line. The names load on first
use, so that ``unisd-train`` can report a missing extra instead of failing on import.
"""

import importlib

_EXPORTS = {
    "TrainConfig": ".config",
    "load_config": ".config",
    "main": ".cli",
    "run": ".loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
