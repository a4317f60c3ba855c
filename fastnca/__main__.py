"""``python -m fastnca COMMAND ...``: the same as the ``fastnca`` console script (see fastnca/cli.py)."""

import sys

from fastnca.cli import main

if __name__ == "__main__":
    sys.exit(main())
