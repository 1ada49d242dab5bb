"""Real-size, random-weight models built from known configs, so speed can be studied without downloading weights.

Timing does not depend on weight values, only on shapes, so these reproduce the cost of the real checkpoints. Each
entry is a function returning a ``LlavaForConditionalGeneration`` in eval mode; ``synthetic_inputs`` makes a
prompt with the model's full placeholder run.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import UnsupportedModelError


def _llava15_cpu():
    """CLIP-L/14-336 (24 layers, 577 tokens) + a Qwen2-0.5B-sized LM (24 layers, width 896, 14 heads / 2 KV heads).

    The CPU reference: big enough that the vision encoder and the LM prefill each cost seconds, as in LLaVA-1.5,
    small enough to run on a 2-core machine.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=151646, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def _llava15_7b():
    """LLaVA-1.5-7B: CLIP-L/14-336 + Vicuna-7B (Llama-2-7B shapes: 32 layers, width 4096, 32 heads, MLP 11008).

    About 7.06 B parameters: 28 GB in fp32, 14 GB in fp16/bf16. On a machine that cannot hold it, use it for
    config-only FLOPs (:func:`tokensieve.flops.count_flops` needs no weights).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def _tiny():
    """The tiny test/demo LLaVA (:mod:`tokensieve.tiny`): a 12x12 grid, milliseconds per call."""
    from .tiny import build_tiny_llava

    return build_tiny_llava()[0].config


ARCHS: dict[str, Callable] = {"llava15-cpu": _llava15_cpu, "llava15-7b": _llava15_7b, "tiny": _tiny}
"""Name -> config factory."""


def arch_config(name: str):
    if name not in ARCHS:
        raise UnsupportedModelError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[name]()


def arch_parameters(name_or_config) -> int:
    """Parameter count of an architecture (name or LLaVA config) without allocating it (built on the meta device)."""
    from transformers import LlavaForConditionalGeneration

    config = arch_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def build_arch(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A random-weight model of architecture ``name`` (see :data:`ARCHS`), seeded, in eval mode."""
    from transformers import LlavaForConditionalGeneration

    config = arch_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def synthetic_inputs(model, text_tokens: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """One image's full placeholder run inside ``text_tokens`` random text tokens, plus random pixels.

    ``model`` may be a config alone (for FLOPs-only analysis); the tensors are then fp32 on the CPU.
    """
    config = getattr(model, "config", model)
    vc = config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size
    low = min(100, vocab // 2)
    text = torch.randint(low, min(1000, vocab), (text_tokens,), generator=g)
    text[text == config.image_token_id] = low - 1
    img = torch.full((n_img,), config.image_token_id)
    ids = torch.cat([text[:5], img, text[5:]])[None]
    param = next(model.parameters()) if hasattr(model, "parameters") else torch.empty(0)
    pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=g).to(param.dtype)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    return {k: v.to(param.device) for k, v in batch.items()}
