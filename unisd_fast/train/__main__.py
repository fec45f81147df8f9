"""``python -m unisd_fast.train``."""

import sys

from .cli import main

sys.exit(main())
