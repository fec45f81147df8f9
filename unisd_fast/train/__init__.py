"""The UniSD trainer (extra ``[train]``): on-policy self-distillation of a causal LM.

``run(cfg)`` trains from a :class:`TrainConfig`; ``main(argv)`` is the ``unisd-train``
command line.
"""

from .cli import main
from .config import TrainConfig
from .loop import run

__all__ = ["TrainConfig", "main", "run"]
