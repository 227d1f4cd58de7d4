"""Entry point: ``python -m bench --help``."""

import sys

from .runner import main

sys.exit(main())
