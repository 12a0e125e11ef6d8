"""``python -m asd_engine``: see :mod:`asd_engine.cli`."""

import sys

from .cli import main

sys.exit(main())
