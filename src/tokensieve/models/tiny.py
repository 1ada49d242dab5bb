"""A tiny random-weight LLaVA with a real processor, built from configs in memory.

It exists for plumbing: tests and the demo run the exact code path a real LLaVA-1.5 takes (CLIP tower, feature
layer -2, MLP projector, Llama LM, processor-made inputs) in milliseconds. Its answers are meaningless.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

_WORDS = (
    "user assistant : ? . , what is are in on the a an of this that picture image photo describe how many there "
    "color colour shape left right top bottom above below cat cats dog couch red green blue yellow black white "
    "circle square triangle small large big one two three four five yes no and it"
).split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}"
    "{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)

QUESTION_FIRST_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)
"""The default model's template: a message's text before its images, whatever their order in the content list, so
the visual tokens (causal attention) can read the question (see ``TrainConfig.question_first``)."""


def build_tokenizer(words: list[str] | tuple[str, ...] = _WORDS):
    """A word-level tokenizer over ``words`` (lower-cased; punctuation split off) with the LLaVA specials."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in dict.fromkeys(words) if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def build_processor(
    tokenizer,
    image_size: int,
    patch_size: int,
    vision_feature_select_strategy: str = "default",
    chat_template: str = CHAT_TEMPLATE,
):
    """A LLaVA-1.5-style processor (CLIP preprocessing, CLS counted, chat template) around ``tokenizer``."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def build_tiny_llava(
    *,
    image_size: int = 48,
    patch_size: int = 4,
    vision_layers: int = 6,
    text_layers: int = 4,  # deep enough for in-LLM methods pruning after layer 2
    attn_implementation: str = "sdpa",
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    seed: int = 0,
):
    """Return ``(model, processor)``; same seed, same weights, whatever the attention implementation."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, image_size, patch_size, vision_feature_select_strategy)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=512,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def demo_image(size: int = 320, seed: int = 0) -> Image.Image:
    """A small synthetic scene (a few coloured shapes on a plain background), so the demo needs no files."""
    g = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", (size, size), (236, 232, 220))
    draw = ImageDraw.Draw(img)
    colours = [(200, 40, 40), (40, 140, 60), (40, 70, 200), (230, 190, 30)]
    for i, colour in enumerate(colours):
        x, y = (torch.rand(2, generator=g) * (size * 0.7)).tolist()
        r = size * (0.06 + 0.05 * i)
        box = [x, y, x + r, y + r]
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colour)
    return img
