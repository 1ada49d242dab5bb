"""``python -m tokensieve``: the same command line as the ``tokensieve`` script."""

import sys

from .cli import main

sys.exit(main())
