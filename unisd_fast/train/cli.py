"""``unisd-train`` / ``python -m unisd_fast.train``: the command line of the trainer."""

from __future__ import annotations

import json
import logging
import sys

from .compare import run_reported
from .config import ConfigError, parse_args
from .loop import run
from .tasks import DataError, builtin_name


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
        if cfg.compare or builtin_name(cfg.data) == "facts":
            summary = run_reported(cfg)
        else:
            summary = run(cfg)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        print(f"unisd-train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
