"""``unisd-train`` / ``python -m unisd_fast.train``: the command line of the trainer.

The arguments are read before torch and transformers are imported, so that ``--help`` and
argument errors answer at once: this module, :mod:`.config` and :mod:`.errors` need only the
standard library and ``unisd_fast.config``; a missing ``[train]`` extra is reported as such.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    OutputDirLocked,
    TrainingDiverged,
)

EXTRA = ("transformers", "tqdm", "yaml")
INSTALL = 'pip install "unisd-fast[train]"'
# Reported in one line with exit status 2: the input is wrong, nothing was trained.
BAD_INPUT = (
    ConfigError,
    DataError,
    CheckpointError,
    FileNotFoundError,
    FileExistsError,
    OutputDirLocked,
)


def missing_extra() -> list[str]:
    """The modules of the ``[train]`` extra that are not installed (found, not imported)."""
    return [name for name in EXTRA if importlib.util.find_spec(name) is None]


def main(argv=None) -> int:
    missing = missing_extra()
    if missing:
        print(
            f"unisd-train: error: the trainer needs the [train] extra ({', '.join(missing)} "
            f"cannot be imported): {INSTALL}",
            file=sys.stderr,
        )
        return 1
    from .config import parse_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
        from .compare import run_reported  # torch, transformers and the trainer

        summary = run_reported(cfg)
    except BAD_INPUT as e:
        print(f"unisd-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"unisd-train: error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone prints it
        print(json.dumps(summary, indent=2))
    return 0
