"""Running vLLM's LLaVA on CPU-only torch, where torchvision cannot be used.

The torchvision on the package index is a CUDA build: with the CPU torch wheel its C extension does not load and
``import torchvision`` fails (``operator torchvision::nms does not exist``). The install drops it (transformers and
vLLM then use their PIL / OpenCV image paths), but vLLM's ``llava.py`` imports ``pixtral.py``, which imports one
helper, ``_num_image_tokens``, from transformers' torchvision image processor module, and that module imports
torchvision at its top. transformers ships the same helper in its PIL processor module; when torchvision is absent
we register a module under the torchvision module's name that holds only that helper, so the import succeeds and
everything else in that module still fails loudly if anyone asks for it.
"""

from __future__ import annotations

import importlib.util
import sys
import types

_TV_MODULE = "transformers.models.pixtral.image_processing_pixtral"


class _NeedsTorchvision(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):  # module introspection (inspect, pickle) must see an ordinary module
            raise AttributeError(name)
        raise AttributeError(
            f"{_TV_MODULE}.{name} needs torchvision, which is not installed; tokensieve-vllm only provides "
            "`_num_image_tokens` from transformers' PIL image processor in its place"
        )


def allow_llava_without_torchvision() -> None:
    """Make vLLM's LLaVA importable without torchvision; a no-op when torchvision is installed."""
    if _TV_MODULE in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    module = _NeedsTorchvision(_TV_MODULE)
    module._num_image_tokens = pil._num_image_tokens
    sys.modules[_TV_MODULE] = module
