"""Training the embedded default models (``training/train_default.py`` is the command)."""

from .core import *  # noqa: F401,F403
from .core import _per_patch  # noqa: F401
