"""tokensieve: training-free visual-token compression for Hugging Face vision-language models.

Names that need torch or transformers are imported on first use: ``import tokensieve`` and the command line's
``--help`` load neither, and ``import tokensieve.methods`` (the selectors, the budget vocabulary, the errors and the
reports need torch only) works in an environment whose ``transformers`` differs from the pinned one (a vLLM server:
see ``integrations/vllm``).
"""

from importlib import import_module

from . import _compat
from ._version import __version__ as __version__  # the package version (re-exported)
from .budget import Budget, Scope
from .errors import (
    BudgetError,
    BudgetTypeError,
    InputError,
    MissingSignalError,
    NonFiniteFeaturesError,
    ParameterError,
    PlaceholderError,
    TokensieveError,
    UnknownMethodError,
    UnsupportedModelError,
)

_compat.install()  # old module paths (tokensieve.flops, tokensieve.evaluate, ...) keep working

_LAZY = {
    "Sieve": "session",
    "SieveHandle": "session",
    "list_methods": "session",
    "MethodInfo": "session",
    "SieveReport": "report",
    "ImageReport": "report",
    "load_default_model": "models.loading",
    "load_model": "models.loading",
    "Adaptive": "adaptive",
    "Calibration": "adaptive",
}

__all__ = [
    "Sieve",
    "SieveHandle",
    "Budget",
    "Scope",
    "Adaptive",
    "Calibration",
    "list_methods",
    "MethodInfo",
    "SieveReport",
    "ImageReport",
    "load_default_model",
    "load_model",
    "TokensieveError",
    "BudgetError",
    "BudgetTypeError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "PlaceholderError",
    "NonFiniteFeaturesError",
    "MissingSignalError",
    "InputError",
    "ParameterError",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokensieve' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
