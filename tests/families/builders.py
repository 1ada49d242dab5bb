"""Tiny random-weight models of the other supported families, with the inputs their processors make.

Qwen2VLProcessor cannot be built here (its video processor needs torchvision, which does not install next to the
pinned CPU torch), so :class:`TinyQwenProcessor` does what it does with the real tokenizer-side rules: the real
``Qwen2VLImageProcessorPil`` makes the pixel patches, each ``<|image_pad|>`` / ``<|video_pad|>`` is expanded to
``grid.prod() // merge**2`` copies, and ``mm_token_type_ids`` marks them 1 / 2. A video is a list of equally sized
frames; pairs of frames become one temporal patch, exactly the patch order of the real video processor.

Imports only torch, transformers and ``tokensieve.models.tiny``: the vLLM integration's reference scripts
(``integrations/vllm/tests/reference_*.py``) import these builders as a plain module in the core environment.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from tokensieve.models.tiny import _WORDS

QWEN_SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PATCH, MERGE = 8, 2


def qwen_tokenizer():
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(QWEN_SPECIALS + _WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


class TinyQwenProcessor:
    def __init__(self, side: int = 32):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = qwen_tokenizer()
        self.image_processor = Qwen2VLImageProcessorPil(
            min_pixels=(2 * PATCH * MERGE) ** 2,
            max_pixels=(side * 2) ** 2,
            patch_size=PATCH,
            merge_size=MERGE,
            temporal_patch_size=2,
        )
        self.ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}

    def _patches(self, images):
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def __call__(self, texts, images=(), videos=(), padding_side="left"):
        """``texts`` use ``<image>`` / ``<video>`` markers, consumed in order across the batch."""
        images, videos = list(images), list(videos)
        batch = {}
        if images:
            batch["pixel_values"], batch["image_grid_thw"] = self._patches(images)
        if videos:
            pv, grids = [], []
            for frames in videos:
                assert len(frames) % 2 == 0, "a tiny video has an even number of frames"
                p, g = self._patches(frames[::2])  # each frame pair is one temporal patch of identical frames
                pv.append(p)
                grids.append(torch.tensor([len(frames) // 2, int(g[0, 1]), int(g[0, 2])]))
            batch["pixel_values_videos"], batch["video_grid_thw"] = torch.cat(pv), torch.stack(grids)
        rows = []
        it_img, it_vid = iter(batch.get("image_grid_thw", [])), iter(batch.get("video_grid_thw", []))
        for text in texts:
            ids, tt = [self.ids["<s>"]], [0]
            for word in text.split():
                if word in ("<image>", "<video>"):
                    grid = next(it_img if word == "<image>" else it_vid)
                    n = int(grid.prod()) // MERGE**2
                    pad = self.ids["<|image_pad|>" if word == "<image>" else "<|video_pad|>"]
                    ids += [self.ids["<|vision_start|>"]] + [pad] * n + [self.ids["<|vision_end|>"]]
                    tt += [0] + [1 if word == "<image>" else 2] * n + [0]
                else:
                    wid = self.tokenizer(word, add_special_tokens=False)["input_ids"]
                    ids += wid
                    tt += [0] * len(wid)
            rows.append((ids, tt))
        length = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), length), self.ids["<pad>"])
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        mm = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (ids, tt) in enumerate(rows):
            sl = slice(length - len(ids), None) if padding_side == "left" else slice(0, len(ids))
            input_ids[b, sl] = torch.tensor(ids)
            mask[b, sl] = 1
            mm[b, sl] = torch.tensor(tt)
        batch.update(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm)
        return batch


def build_tiny_qwen(
    kind: str = "qwen2_vl",
    *,
    vision_layers: int = 4,
    text_layers: int = 2,
    seed: int = 0,
    text_overrides: dict | None = None,
    vision_overrides: dict | None = None,
):
    """``kind`` is ``qwen2_vl`` or ``qwen2_5_vl``; returns ``(model, processor)``. ``text_overrides`` /
    ``vision_overrides`` change the LM / ViT config (the vLLM tests need head sizes vLLM's CPU attention supports)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    proc = TinyQwenProcessor()
    tok = proc.tokenizer
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=proc.ids["<pad>"],
        bos_token_id=proc.ids["<s>"],
        eos_token_id=proc.ids["</s>"],
    )
    text.update(text_overrides or {})
    common = dict(
        image_token_id=proc.ids["<|image_pad|>"],
        video_token_id=proc.ids["<|video_pad|>"],
        vision_start_token_id=proc.ids["<|vision_start|>"],
        vision_end_token_id=proc.ids["<|vision_end|>"],
    )
    if kind == "qwen2_vl":
        vision = dict(
            depth=vision_layers,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            mlp_ratio=2,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
            in_channels=3,
        )
        config, cls = Qwen2VLConfig(vision_config=vision, text_config=text, **common), Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        # window 32 px = 2x2 merge units per window; blocks 1 and 3 attend globally
        vision = dict(
            depth=vision_layers,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=4,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
            in_channels=3,
            window_size=32,
            fullatt_block_indexes=[1, vision_layers - 1],
        )
        vision.update(vision_overrides or {})
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **common)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(kind)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.pad_token_id = proc.ids["<pad>"]
    return model.eval(), proc


def build_tiny_llava_next(
    *,
    image_size: int = 16,
    patch_size: int = 4,
    vision_layers: int = 4,
    seed: int = 0,
    text_layers: int = 2,
    text_overrides: dict | None = None,
):
    """Tiny LLaVA-NeXT (CLIP tower, anyres with unpadding and image_newline) and its real processor.
    ``text_overrides`` changes the LM config (the vLLM tests need head sizes vLLM's CPU attention supports)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from tokensieve.models.tiny import CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer()
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        **{
            **dict(
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
            ),
            **(text_overrides or {}),
        }
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def build_tiny_onevision(
    *, image_size: int = 16, patch_size: int = 4, vision_layers: int = 4, seed: int = 0, text_layers: int = 2
):
    """Tiny LLaVA-OneVision (SigLIP tower, anyres_max_9) and an input builder.

    LlavaOnevisionProcessor cannot be built here (its video processor needs torchvision); the real image processor
    makes the pixels, and each ``<image>`` marker is expanded to as many placeholders as the model's own
    ``get_image_features`` yields for that image, which is what the processor's count must equal.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from tokensieve.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    pinpoints = [[image_size * a, image_size * b] for a in (1, 2, 3) for b in (1, 2, 3)]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = Qwen2Config(
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
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, _placeholder_builder(model, tokenizer, image_processor)


def build_tiny_llava_next_video(*, image_size: int = 16, patch_size: int = 4, seed: int = 0, text_layers: int = 2):
    """Tiny LLaVA-NeXT-Video (CLIP tower, average-pooling resampler) and an input builder like OneVision's."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from tokensieve.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
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
    config = LlavaNextVideoConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaNextVideoForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, _placeholder_builder(model, tokenizer, image_processor)


def _placeholder_builder(model, tokenizer, image_processor):
    """Inputs for a LLaVA-family model whose processor cannot be built here: the real image processor makes the
    pixels and each ``<image>`` / ``<video>`` marker becomes as many placeholders as the model's own feature
    functions yield, which is the count the processor must produce."""
    image_id, video_id = model.config.image_token_id, model.config.video_token_id

    def make_inputs(texts, images=(), videos=()):
        """``images``: a flat list (one per prompt) or one list per prompt (several images in one prompt).
        ``videos``: lists of frames, all videos with the same frame count (the model stacks them); each frame is the
        image processor's base view, as the video processor's resize would give."""
        pix, counts, video_counts = {}, [], []
        if images:
            pix = dict(image_processor(images=images, return_tensors="pt"))
            extra = {"batch_num_images": pix["batch_num_images"]} if "batch_num_images" in pix else {}
            with torch.inference_mode():
                counts = [
                    f.shape[0]
                    for f in model.model.get_image_features(
                        pix["pixel_values"], pix["image_sizes"], **extra
                    ).pooler_output
                ]
        if videos:
            pix["pixel_values_videos"] = torch.stack(
                [
                    torch.cat([image_processor(images=[f], return_tensors="pt")["pixel_values"][:, 0] for f in v])
                    for v in videos
                ]
            )
            with torch.inference_mode():
                out = model.model.get_video_features(pix["pixel_values_videos"]).pooler_output
            video_counts = [out.shape[1]] * out.shape[0]
        it, it_v = iter(counts), iter(video_counts)
        rows = []
        for text in texts:
            ids = [tokenizer.bos_token_id]
            for word in text.split():
                if word == "<image>":
                    ids += [image_id] * next(it)
                elif word == "<video>":
                    ids += [video_id] * next(it_v)
                else:
                    ids += tokenizer(word, add_special_tokens=False)["input_ids"]
            rows.append(ids)
        length = max(map(len, rows))
        input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
        mask = torch.zeros_like(input_ids)
        for b, ids in enumerate(rows):
            input_ids[b, length - len(ids) :] = torch.tensor(ids)
            mask[b, length - len(ids) :] = 1
        return dict(input_ids=input_ids, attention_mask=mask, **pix)

    return make_inputs


SMOLVLM_DIR = "/work/shared/data/smolvlm-256m-instruct-config"


def build_tiny_idefics3(*, vision_layers: int = 2, seed: int = 0, text_layers: int = 2, smolvlm: bool = False):
    """Tiny Idefics3 (or the separate SmolVLM class) with SmolVLM-256M's real processor and tokenizer, shrunk to
    32 px crops (16 tokens each)."""
    import os

    from transformers import (
        AutoProcessor,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    d = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "smolvlm-256m-instruct-config")
    d = d if os.path.isdir(d) else SMOLVLM_DIR
    proc = AutoProcessor.from_pretrained(
        d, image_seq_len=16, size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
    )
    proc.tokenizer.padding_side = "left"
    real = Idefics3Config.from_pretrained(d)
    vocab = len(proc.tokenizer)
    config_cls, model_cls = (
        (SmolVLMConfig, SmolVLMForConditionalGeneration)
        if smolvlm
        else (Idefics3Config, Idefics3ForConditionalGeneration)
    )
    config = config_cls(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=vision_layers,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            pad_token_id=real.text_config.pad_token_id,
            max_position_embeddings=1024,
        ),
        scale_factor=2,
        image_token_id=real.image_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.pad_token_id = real.text_config.pad_token_id
    return model.eval(), proc
