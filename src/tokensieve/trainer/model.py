"""The default model's architecture: stock LLaVA-1.5 classes at a CPU-trainable size, and its word-level vocabulary.

Stock classes only (``LlavaForConditionalGeneration``, CLIP vision tower with its CLS token, Llama LM,
``vision_feature_layer=-2``), so what the methods see is what they would see in LLaVA-1.5, just smaller.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..data import easyvqa, shapes
from ..models.tiny import _WORDS, CHAT_TEMPLATE, QUESTION_FIRST_TEMPLATE, SPECIALS, build_processor, build_tokenizer
from .config import TrainConfig

CHAT_WORDS = ["user", "assistant", ":"]
"""The words the chat template writes around a question (:data:`tiny.CHAT_TEMPLATE`): the tokenizer must know them."""


def vocabulary() -> list[str]:
    """Every word the data uses plus the demo's, fixed in order so the same config gives the same tokenizer."""
    words = set(shapes.WORDS) | set(shapes.TRAINING_WORDS) | easyvqa.words() | set(_WORDS) | set(CHAT_WORDS)
    return sorted(words - set(SPECIALS))


def build_model(cfg: TrainConfig):
    """Fresh ``(model, processor)`` for ``cfg``, seeded."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_tokenizer(vocabulary())
    processor = build_processor(
        tokenizer,
        cfg.image_size,
        cfg.patch_size,
        chat_template=QUESTION_FIRST_TEMPLATE if cfg.question_first else CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_width,
        intermediate_size=cfg.vision_mlp,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    text = LlamaConfig(
        hidden_size=cfg.text_width,
        intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = LlavaForConditionalGeneration(config)
    if cfg.sincos_positions:
        _sincos_position_init(model, cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.max_new_tokens = 4
    return model, processor


def _sincos_position_init(model, cfg: TrainConfig) -> None:
    """Start CLIP's learned position table from a 2-D sine-cosine grid instead of small noise.

    Only the initial values change (the table stays learned, the class stays stock CLIP). With a 0.02-std table the
    patches barely know where they are, and questions about quadrants and relations stall until it is learned.
    """
    emb = model.model.vision_tower.embeddings.position_embedding.weight
    side = cfg.image_size // cfg.patch_size
    dim = emb.shape[1]
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angle = coord[:, None] * freq[None]
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, 1)
    with torch.no_grad():
        emb[1:, : table.shape[1]] = 0.5 * table
        emb[1:, table.shape[1] :] = 0.0


def warm_start(model, source: str | Path) -> list[str]:
    """Copy a saved model's weights into ``model``; returns the names that had to be resized.

    Tensors of equal shape are copied as they are. CLIP's position table is resampled as a grid (bicubic, [CLS]
    row kept) and the patch kernel resized (bilinear, scaled by the area ratio and shifted so a flat colour gives
    the same embedding) when the image or patch size differ, as when a ViT is moved to a higher resolution. Any
    other shape mismatch is an error.
    """
    from transformers import AutoModelForImageTextToText

    src = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).state_dict()
    dst = model.state_dict()
    resized, problems = [], []
    with torch.no_grad():
        for name, value in dst.items():
            if name not in src:
                problems.append(f"{name} missing in {source}")
                continue
            old = src[name]
            if old.shape == value.shape:
                value.copy_(old)
            elif name.endswith("position_embedding.weight") and old.shape[1] == value.shape[1]:
                side_old, side_new = math.isqrt(old.shape[0] - 1), math.isqrt(value.shape[0] - 1)
                grid = old[1:].T.reshape(1, -1, side_old, side_old)
                grid = nn.functional.interpolate(grid, size=(side_new, side_new), mode="bicubic", align_corners=False)
                value[0] = old[0]
                value[1:] = grid.reshape(-1, side_new * side_new).T
                resized.append(name)
            elif name.endswith("patch_embedding.weight") and old.shape[:2] == value.shape[:2]:
                area = value.shape[2] * value.shape[3]
                kernel = nn.functional.interpolate(old, size=value.shape[2:], mode="bilinear", align_corners=False)
                kernel = kernel * (old.shape[2] * old.shape[3]) / area
                # an even shift per (out, in) channel makes the sums equal: a flat colour embeds exactly as before
                kernel += (old.sum((2, 3), keepdim=True) - kernel.sum((2, 3), keepdim=True)) / area
                value.copy_(kernel)
                resized.append(name)
            else:
                problems.append(f"{name}: {tuple(old.shape)} in {source}, {tuple(value.shape)} here")
    if problems:
        raise ValueError("cannot start from " + str(source) + ": " + "; ".join(problems))
    return resized
