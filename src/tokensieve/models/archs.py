"""Real-size, random-weight models built from known configs, so speed can be studied without downloading weights.

Timing does not depend on weight values, only on shapes, so these reproduce the cost of the real checkpoints. Each
entry is a function returning a ``LlavaForConditionalGeneration`` in eval mode; ``synthetic_inputs`` makes a
prompt with the model's full placeholder run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UnsupportedModelError


def _llava15_cpu():
    """CLIP-L/14-336 (24 layers, 577 tokens) + a Qwen2-0.5B-sized LM (24 layers, width 896, 14 heads / 2 KV heads).

    The CPU reference: big enough that the vision encoder and the LM prefill each cost seconds, as in LLaVA-1.5,
    small enough to run on a 2-core machine.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=151646,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _llava15_7b():
    """LLaVA-1.5-7B: CLIP-L/14-336 + Vicuna-7B (Llama-2-7B shapes: 32 layers, width 4096, 32 heads, MLP 11008).

    About 7.06 B parameters: 28 GB in fp32, 14 GB in fp16/bf16. On a machine that cannot hold it, use it for
    config-only FLOPs (:func:`tokensieve.tools.flops.count_flops` needs no weights).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _tiny():
    """The tiny test/demo LLaVA (:mod:`tokensieve.models.tiny`): a 12x12 grid, milliseconds per call."""
    from .tiny import build_tiny_llava

    return build_tiny_llava()[0].config


ARCHS: dict[str, Callable] = {"llava15-cpu": _llava15_cpu, "llava15-7b": _llava15_7b, "tiny": _tiny}
"""Name -> config factory."""


def arch_config(name: str):
    if name not in ARCHS:
        raise UnsupportedModelError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[name]()


def meta_model(config):
    """The model a config describes, on the meta device: shapes and code without memory or weights."""
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    with torch.device("meta"):
        if getattr(config, "model_type", None) == "llava":
            return LlavaForConditionalGeneration(config)
        return AutoModelForImageTextToText.from_config(config)


def arch_parameters(name_or_config) -> int:
    """Parameter count of an architecture (name or config of any supported family) without allocating it."""
    config = arch_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return sum(p.numel() for p in meta_model(config).parameters())


def build_arch(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A random-weight model of architecture ``name`` (see :data:`ARCHS`), seeded, in eval mode."""
    from transformers import LlavaForConditionalGeneration

    config = arch_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


QWEN_GRID = 24
"""Patch rows and columns of the synthetic Qwen-VL image (336 px at patch 14: 144 LM tokens after the merger)."""


def synthetic_inputs(model, text_tokens: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """One image's full placeholder run inside ``text_tokens`` random text tokens, plus random pixels.

    ``model`` may be a config alone (for FLOPs-only analysis); the tensors are then fp32 on the CPU. Every supported
    family works without its processor (timing and FLOPs depend on shapes only): LLaVA-1.5 at the config's image
    size; LLaVA-NeXT, NeXT-Video and OneVision an image of one crop's size, with the anyres crops and placeholders
    the model's own packing gives it; Qwen-VL a 24x24-patch image (``image_grid_thw``); Idefics3 / SmolVLM one crop.
    """
    config = getattr(model, "config", model)
    vc = config.vision_config
    g = torch.Generator().manual_seed(seed)
    param = next(model.parameters()) if hasattr(model, "parameters") else torch.empty(0)
    if param.device.type == "meta":
        param = torch.empty(0)
    family = getattr(config, "model_type", None)
    if family == "llava":
        n_img = (vc.image_size // vc.patch_size) ** 2
        pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=g)
        visual, extra = torch.full((n_img,), config.image_token_id), {}
    else:
        visual, pixels, extra = _family_visual(model if hasattr(model, "parameters") else None, config, g)
    vocab = config.get_text_config().vocab_size
    low = min(100, vocab // 2)
    text = torch.randint(low, min(1000, vocab), (text_tokens,), generator=g)
    special = [
        getattr(config, k, None)
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    ]
    text[torch.isin(text, torch.tensor([t for t in special if t is not None]))] = low - 1
    ids = torch.cat([text[:5], visual, text[5:]])[None]
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels.to(param.dtype), **extra)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        batch["mm_token_type_ids"] = (ids == config.image_token_id).long()
    return {k: v.to(param.device) for k, v in batch.items()}


def _family_visual(model, config, g: torch.Generator):
    """``(placeholder run, pixel_values, other processor outputs)`` of one synthetic image of a non-LLaVA-1.5 family."""
    from ..adapters import get_adapter

    vc = config.vision_config
    family = config.model_type
    if family in ("qwen2_vl", "qwen2_5_vl"):
        merge = int(vc.spatial_merge_size)
        side = QWEN_GRID - QWEN_GRID % (2 * merge)
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        pixels = torch.randn(side * side, width, generator=g)
        run = (
            [config.vision_start_token_id]
            + [config.image_token_id] * (side * side // merge**2)
            + [config.vision_end_token_id]
        )
        return torch.tensor(run), pixels, {"image_grid_thw": torch.tensor([[1, side, side]])}
    size = vc.image_size
    if family in ("idefics3", "smolvlm"):  # the global view alone: one crop
        side = size // vc.patch_size // int(config.scale_factor)
        pixels = torch.randn(1, 1, 3, size, size, generator=g)
        mask = torch.ones(1, 1, size, size, dtype=torch.bool)
        return torch.full((side * side,), config.image_token_id), pixels, {"pixel_attention_mask": mask}
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    crops = int(image_size_to_num_patches((size, size), config.image_grid_pinpoints, size))
    pixels = torch.randn(1, crops, 3, size, size, generator=g)
    extra = {"image_sizes": torch.tensor([[size, size]])}
    if family == "llava_onevision":
        extra["batch_num_images"] = torch.tensor([1])
    adapter = get_adapter(
        model if model is not None and next(model.parameters()).device.type != "meta" else meta_model(config)
    )
    n = adapter.tokens_per_image(dict(pixel_values=pixels, **extra))[0]
    return torch.full((n,), config.image_token_id), pixels, extra
