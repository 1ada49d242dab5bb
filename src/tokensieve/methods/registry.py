"""Methods by name. A method file registers its class with ``@register``; the package imports every file once.

Kept apart from the package's ``__init__`` so a method file imports only this registry and the contracts, never
the package that imports it.
"""

from __future__ import annotations

from ..errors import UnknownMethodError
from .base import Method

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
