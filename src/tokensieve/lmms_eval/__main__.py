"""``python -m tokensieve.lmms_eval ARGS``: lmms-eval with tokensieve's task folder, offline, failing loudly."""

import sys

from .launch import main

sys.exit(main())
