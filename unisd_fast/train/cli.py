"""``unisd-train`` / ``python -m unisd_fast.train``: the command line of the trainer.

Importing this module needs nothing beyond the standard library, so that a missing
``[train]`` extra is reported as such."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

EXTRA = ("transformers", "tqdm", "yaml")
INSTALL = 'pip install "unisd-fast[train]"'


def missing_extra() -> list[str]:
    """The modules of the ``[train]`` extra that cannot be imported."""
    missing = []
    for name in EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def main(argv=None) -> int:
    missing = missing_extra()
    if missing:
        print(
            f"unisd-train: error: the trainer needs the [train] extra ({', '.join(missing)} "
            f"cannot be imported): {INSTALL}",
            file=sys.stderr,
        )
        return 1
    from .compare import run_reported
    from .config import ConfigError, parse_args
    from .guard import TrainingDiverged
    from .lock import OutputDirLocked
    from .resume import CheckpointError
    from .tasks import DataError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
        summary = run_reported(cfg)
    except (
        ConfigError,
        DataError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        OutputDirLocked,
    ) as e:
        print(f"unisd-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"unisd-train: error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone prints it
        print(json.dumps(summary, indent=2))
    return 0
