"""``python -m asd_engine``: see :mod:`asd_engine.cli`."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is still importing: nothing has started yet
    sys.stderr.write("interrupted before anything started; nothing was written\n")
    sys.exit(130)

sys.exit(main())
