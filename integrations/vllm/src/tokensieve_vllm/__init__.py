"""tokensieve inside vLLM: its own architecture names, opted into per model with ``hf_overrides``.

vLLM calls :func:`register` in every process it starts (entry point ``vllm.general_plugins``). It registers the
architectures below lazily (by import string, so nothing heavy is imported until a model asks for one) and never
replaces a stock architecture: a model runs through tokensieve only when its ``hf_overrides`` name one of these.
"""

from __future__ import annotations

ARCHITECTURES = {
    "TokenSieveLlavaForConditionalGeneration": "tokensieve_vllm.llava:TokenSieveLlavaForConditionalGeneration",
    "TokenSieveLlavaNextForConditionalGeneration": (
        "tokensieve_vllm.llava_next:TokenSieveLlavaNextForConditionalGeneration"
    ),
    "TokenSieveQwen2_5_VLForConditionalGeneration": (
        "tokensieve_vllm.qwen_vl:TokenSieveQwen2_5_VLForConditionalGeneration"
    ),
}
"""Architecture name -> ``module:class``. LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL; other families are not registered,
so vLLM refuses them at start-up with its list of supported architectures."""


def register() -> None:
    from vllm import ModelRegistry

    from .compat import allow_without_torchvision

    allow_without_torchvision()
    for name, target in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)


__all__ = ["ARCHITECTURES", "register"]
