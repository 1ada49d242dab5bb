"""tokensieve: training-free visual-token compression for Hugging Face vision-language models."""

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
from .session import MethodInfo, Sieve, SieveHandle, list_methods

__version__ = "0.1.0"

__all__ = [
    "Sieve", "SieveHandle", "Budget", "Scope", "Adaptive", "Calibration", "list_methods", "MethodInfo", "SieveReport", "ImageReport",
    "TokensieveError", "BudgetError", "BudgetTypeError", "UnknownMethodError", "UnsupportedModelError",
    "PlaceholderError", "NonFiniteFeaturesError", "MissingSignalError",
]
