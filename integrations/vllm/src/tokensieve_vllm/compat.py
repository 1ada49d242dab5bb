"""Running vLLM's LLaVA and Qwen2.5-VL on CPU-only torch, where torchvision cannot be used.

The torchvision on the package index is a CUDA build: with the CPU torch wheel its C extension does not load and
``import torchvision`` fails (``operator torchvision::nms does not exist``). The install drops it (transformers and
vLLM then use their PIL / OpenCV image paths), but vLLM's model files import a pure helper or two from transformers'
torchvision image processor modules, which import torchvision at their top: ``llava.py`` (through ``pixtral.py``)
imports ``_num_image_tokens``, ``qwen2_vl.py`` (imported by ``qwen2_5_vl.py``) imports ``smart_resize``.
transformers ships the same helpers in its PIL processor modules; when torchvision is absent we register a module
under the torchvision module's name that holds only those helpers, so the import succeeds and everything else in
that module still fails loudly if anyone asks for it.
"""

from __future__ import annotations

import importlib.util
import sys
import types

_STAND_INS = {  # torchvision module -> (its PIL twin, the helpers vLLM imports from it)
    "transformers.models.pixtral.image_processing_pixtral": (
        "transformers.models.pixtral.image_processing_pil_pixtral",
        ("_num_image_tokens",),
    ),
    "transformers.models.qwen2_vl.image_processing_qwen2_vl": (
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
        ("smart_resize",),
    ),
}


class _NeedsTorchvision(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):  # module introspection (inspect, pickle) must see an ordinary module
            raise AttributeError(name)
        raise AttributeError(
            f"{self.__name__}.{name} needs torchvision, which is not installed; tokensieve-vllm only provides "
            f"{sorted(n for n in vars(self) if not n.startswith('__'))} from transformers' PIL image processor in "
            "its place"
        )


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def allow_without_torchvision() -> None:
    """Make vLLM's LLaVA and Qwen-VL files importable without torchvision; a no-op when torchvision is installed."""
    if has_torchvision():
        return
    for name, (pil_name, helpers) in _STAND_INS.items():
        if name in sys.modules:
            continue
        pil = importlib.import_module(pil_name)
        module = _NeedsTorchvision(name)
        for helper in helpers:
            setattr(module, helper, getattr(pil, helper))
        sys.modules[name] = module
