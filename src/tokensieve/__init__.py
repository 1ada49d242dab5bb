"""tokensieve: training-free visual-token compression for Hugging Face vision-language models.

The selectors (``tokensieve.methods``), the budget vocabulary, the errors and the reports need torch only. The
``Sieve`` (which hooks ``transformers`` models) is imported on first use, so that ``import tokensieve.methods``
works in an environment whose ``transformers`` differs from the pinned one (a vLLM server: see
``integrations/vllm``).
"""

from .adaptive import Adaptive, Calibration
from .budget import Budget, Scope
from .errors import (
    BudgetError,
    BudgetTypeError,
    MissingSignalError,
    NonFiniteFeaturesError,
    PlaceholderError,
    TokensieveError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .report import ImageReport, SieveReport

__version__ = "0.1.0"

_LAZY = {"Sieve", "SieveHandle", "list_methods", "MethodInfo"}
"""Names served from ``tokensieve.session`` (which imports transformers) on first access."""


def __getattr__(name: str):
    if name in _LAZY:
        from . import session

        value = getattr(session, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokensieve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)


__all__ = [
    "Sieve", "SieveHandle", "Budget", "Scope", "Adaptive", "Calibration", "list_methods", "MethodInfo", "SieveReport", "ImageReport",
    "TokensieveError", "BudgetError", "BudgetTypeError", "UnknownMethodError", "UnsupportedModelError",
    "PlaceholderError", "NonFiniteFeaturesError", "MissingSignalError",
]
