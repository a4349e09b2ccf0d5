"""``python -m errwrap``: the same command line as the ``errwrap`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
