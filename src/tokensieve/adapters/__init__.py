"""Model-family adapters: everything model-specific lives here, one file per family."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .base import Adapter
from .idefics3 import Idefics3Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen_vl import QwenVLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaNextVideoAdapter,
    LlavaOnevisionAdapter,
    QwenVLAdapter,
    Idefics3Adapter,
)


def adapter_class(config) -> type[Adapter]:
    """The adapter class of a model config (its ``model_type``), for facts read before any model is built."""
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise UnsupportedModelError(f"model_type {model_type!r} is not supported by tokensieve; supported: {supported}")


def get_adapter(model) -> Adapter:
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    supported = ", ".join(c for a in ADAPTERS for c in a.model_classes)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported by tokensieve; supported model classes: {supported}"
    )


__all__ = [
    "Adapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaNextVideoAdapter",
    "LlavaOnevisionAdapter",
    "QwenVLAdapter",
    "Idefics3Adapter",
    "ADAPTERS",
    "adapter_class",
    "get_adapter",
]
