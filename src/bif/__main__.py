"""``python -m bif``: the ``bif`` command line, for environments without the console script."""

import sys

from bif.cli import main

if __name__ == "__main__":
    sys.exit(main())
