"""``python -m sparkle``: the command line (see :mod:`sparkle.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
