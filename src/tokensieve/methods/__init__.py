"""Method registry: one pure selector per file in this folder."""

from __future__ import annotations

from ..errors import UnknownMethodError
from .base import (
    IN_LLM,
    POST_PROJECTOR,
    PRE_PROJECTOR,
    Layout,
    LLMMethod,
    LLMSignals,
    Method,
    Request,
    Selection,
    Signals,
)

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str):
        raise UnknownMethodError(f"method name must be a string, got {name!r}")
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def method_names() -> list[str]:
    return sorted(_REGISTRY)


# Import for registration side effects; order is the order of `list_methods()`.
from . import (  # noqa: E402,F401  # noqa: E402,F401  # noqa: E402,F401
    dart,
    divprune,
    evocut,
    evoprune,
    fastervlm,
    fastv,
    flowcut,
    hiprune,
    pdrop,
    pool,
    random,
    todre,
    visionzip,
    vispruner,
    vtc_cls,
)

__all__ = [
    "Layout",
    "Method",
    "LLMMethod",
    "LLMSignals",
    "IN_LLM",
    "Request",
    "Selection",
    "Signals",
    "PRE_PROJECTOR",
    "POST_PROJECTOR",
    "register",
    "get_method",
    "method_names",
]
