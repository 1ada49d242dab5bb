"""The selectors: one pure method per file in this folder, registered by name (``registry.py``).

Contracts: ``base.py`` (before and after the projector), ``encoder.py`` (inside the vision encoder), ``llm.py``
(inside the language model).
"""

from __future__ import annotations

from . import (  # noqa: F401 (imported to register every method)
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
from .base import IN_ENCODER, IN_LLM, POST_PROJECTOR, PRE_PROJECTOR, Layout, Method, Request, Selection, Signals
from .llm import LLMMethod, LLMSignals
from .registry import get_method, method_names, register

__all__ = [
    "Layout",
    "Method",
    "LLMMethod",
    "LLMSignals",
    "IN_ENCODER",
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
