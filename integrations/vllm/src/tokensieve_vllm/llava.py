"""LLaVA-1.5 under vLLM with tokensieve selecting each image's tokens.

Two halves, in two processes:

* Front end (the processor): resolves each request's settings (:mod:`.settings`), so a bad value is a 400 for that
  request, and gives each image ``k`` placeholders instead of the full grid, so vLLM schedules, caches and positions
  the shorter prompt as its own. The resolved setting rides along with the image as the ``tokensieve`` field (and so
  is part of the processor cache entry, whose key already holds the request's ``mm_processor_kwargs``).
* Engine (the model): runs vLLM's CLIP tower layer by layer with tokensieve's capture hooks, hands the method the
  same signals the transformers adapter would (``tokensieve.engine.capture.grid_signals``), and returns exactly ``k``
  embeddings per image. In-encoder methods run through tokensieve's encoder stage on vLLM's layers.

Memory is still sized for the full grid (``get_mm_max_tokens_per_item``), so any per-request budget fits.
vLLM builds the tower only up to the feature layer; this class builds the remaining layers too (one layer of
CLIP), because EvoCut reads the last one; every call runs only as deep as its method reads.
"""

# ruff: noqa: E402 (vLLM modules are imported after allow_without_torchvision() has run)
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence

import torch

from .compat import allow_without_torchvision

allow_without_torchvision()  # before vLLM's llava module is imported (it is also done in register())

from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import MMEncoderAttention
from vllm.model_executor.models.clip import CLIPEncoderLayer, CLIPVisionTransformer
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from tokensieve.engine.capture import AttentionParts, capture_encoder
from tokensieve.engine.select import candidate_rows, grid_cut, grid_outputs, grid_select, selection_lists
from tokensieve.methods.base import IN_ENCODER, POST_PROJECTOR, PRE_PROJECTOR, Request
from tokensieve.plan import Target

from .common import (
    FIELD,
    TRACE_ENV,
    SettingField,
    WithoutTokensieve,
    check_engine,
    decode_spec,
    encode_specs,
    item_spec,
    record,
    request_settings,
    resolve_or_400,
)
from .settings import SieveSpec, llava_target, split_kwargs


class TokenSieveLlavaProcessingInfo(LlavaProcessingInfo):
    def family(self) -> Target:
        return llava_target(self.get_hf_config())

    def spec(self, request_kwargs: Mapping[str, object]) -> SieveSpec | None:
        """The checked setting of one request (server default + its ``mm_processor_kwargs``)."""
        return resolve_or_400(request_settings(self, request_kwargs), self.family())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # the full grid, whatever the server default: a request may ask for every token
        return {"image": self.get_max_image_tokens()}


class KPlaceholders(SettingField):
    """Processor half shared by LLaVA-1.5 and LLaVA-NeXT: the setting field travels with each image, and an image
    gets its setting's ``k`` placeholders (the stock count without one)."""

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                return [image_token_id] * images.get_feature_size(item_idx)
            size = images.get_image_size(item_idx)
            n = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
            spec = item_spec(out_mm_kwargs, "image", item_idx)
            return [image_token_id] * (spec.k if spec is not None else n)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


class TokenSieveLlavaMultiModalProcessor(KPlaceholders, LlavaMultiModalProcessor):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        spec = self.info.spec(hf_kwargs)
        _, rest = split_kwargs(hf_kwargs)
        out = self.info.ctx.call_hf_processor(WithoutTokensieve(self.info.get_hf_processor(**rest)), hf_data, rest)
        pixels = out.get("pixel_values")
        if pixels is not None:
            out[FIELD] = encode_specs([spec] * len(pixels))
        return out


CLIP_NAMES = WeightsMapper(
    orig_to_new_regex={re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)"): r"\1vision_model."}
)
"""transformers 5.2x saves the CLIP tower without the ``vision_model.`` level vLLM's CLIP module has; the names are
mapped at load time (checkpoints that have the level are left alone) instead of rewriting anyone's files."""


class ClipTower:
    """vLLM's CLIP tower as tokensieve runs it (LLaVA-1.5 and LLaVA-NeXT): every layer built, run layer by layer.

    vLLM builds the tower only up to the feature layer; :meth:`_complete_tower` adds the rest (EvoCut reads the
    last one), so the tower's own forward would now run too deep and every call goes through :meth:`_run_tower`.
    ``family_of(hf_config)`` (set by the model class) checks the model at start-up.
    """

    family_of: Callable[[object], Target]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        family = self.family_of(vllm_config.model_config.hf_config)
        check_engine(vllm_config, family)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._family = family
        self._trace = os.environ.get(TRACE_ENV)
        self._complete_tower(vllm_config, prefix)

    def _setting_input(self, kwargs: dict):
        """``(image input, each image's setting)`` of one ``embed_multimodal`` call; settings ``None`` for
        precomputed embeddings (they pass through untouched), image input ``None`` when there is nothing."""
        raw = kwargs.pop(FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None or image_input["type"] != "pixel_values":
            return image_input, None
        n = len(image_input["pixel_values"])
        return image_input, [decode_spec(row) for row in raw] if raw is not None else [None] * n

    def _complete_tower(self, vllm_config: VllmConfig, prefix: str) -> None:
        """Add the CLIP layers vLLM leaves out (those after the feature layer), so EvoCut can read the last one."""
        vm = getattr(self.vision_tower, "vision_model", None)
        if not isinstance(vm, CLIPVisionTransformer):
            return  # text-only deployment (--limit-mm-per-prompt image=0): no tower at all
        vc = self.config.vision_config
        layers = vm.encoder.layers
        for i in range(len(layers), vc.num_hidden_layers):
            layers.append(
                CLIPEncoderLayer(
                    vc,
                    vllm_config.quant_config,
                    attn_cls=MMEncoderAttention,
                    prefix=maybe_prefix(prefix, f"vision_tower.vision_model.encoder.layers.{i}"),
                )
            )

    def _run_tower(self, pixel_values: torch.Tensor, depth: int) -> torch.Tensor:
        """vLLM's CLIP forward, stopped after ``depth`` layers (capture hooks read the states on the way)."""
        vm = self.vision_tower.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixel_values))
        for layer in vm.encoder.layers[:depth]:
            h = layer(h)
        return h

    @staticmethod
    def _attention_parts(layer) -> AttentionParts:
        attn = layer.self_attn
        return AttentionParts(
            None, None, attn.num_heads_per_partition, attn.head_dim, float(attn.scale), qkv_proj=attn.qkv_proj
        )

    def _full_trace(self, depth: int) -> list[int]:
        """Sequence length entering each CLIP layer when the first ``depth`` run uncut (0: not run)."""
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2 + 1
        return [n if i < depth else 0 for i in range(vc.num_hidden_layers)]

    def _record(self, spec: SieveSpec | None, kept: list[list[int]], encoder) -> None:
        record(self._trace, spec, kept, encoder)


@MULTIMODAL_REGISTRY.register_processor(
    TokenSieveLlavaMultiModalProcessor,
    info=TokenSieveLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class TokenSieveLlavaForConditionalGeneration(ClipTower, LlavaForConditionalGeneration):
    """vLLM's LLaVA whose images are compressed by a tokensieve method before they reach the LM."""

    hf_to_vllm_mapper = CLIP_NAMES | LlavaForConditionalGeneration.hf_to_vllm_mapper
    family_of = staticmethod(llava_target)

    # -- engine side -----------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        image_input, specs = self._setting_input(kwargs)
        if image_input is None:
            return []
        if specs is None:
            return self._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        groups: dict[str | None, list[int]] = {}
        for i, spec in enumerate(specs):  # images with the same setting run as one batch
            groups.setdefault(spec.to_json() if spec else None, []).append(i)
        out: list[torch.Tensor | None] = [None] * len(specs)
        for idx in groups.values():
            embeds = self._sieve(pixel_values[idx], specs[idx[0]])
            for j, i in enumerate(idx):
                out[i] = embeds[j]
        return out

    def _sieve(self, pixel_values: torch.Tensor, spec: SieveSpec | None) -> torch.Tensor:
        """[B, k, d] LM embeddings of a batch of images that share one setting: the core's single-grid flow
        (``tokensieve.engine.select``) on vLLM's tower."""
        fam = self._family
        layers = self.vision_tower.vision_model.encoder.layers
        fls = list(fam.feature_layers)
        rows = candidate_rows(fam.num_prefix)  # the projector's tokens: patches (+ CLS under "full")
        if spec is None:  # no method: the stock features (the tower's forward would now run the added layers too)
            with capture_encoder(layers, Request(), self._attention_parts, fls) as cap:
                self._run_tower(pixel_values, max(fls))
                features = torch.cat([cap.hidden_states[f][:, rows] for f in fls], dim=-1)
            self._record(spec, [list(range(features.shape[1]))] * len(features), self._full_trace(max(fls)))
            return self.multi_modal_projector(features)
        method = spec.build()
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        grid = dict(grid=(side, side), num_prefix=fam.num_prefix, num_layers=fam.encoder_layers, feature_layers=fls)
        if method.stage == IN_ENCODER:
            res, selected = grid_cut(
                method,
                spec.k,
                layers=layers,
                attention_parts=self._attention_parts,
                run=lambda pv: self._run_tower(pv, max(fls)),
                pixel_values=pixel_values,
                stop_after=max(fls),
                **grid,
            )
            embeds = self.multi_modal_projector(selected)
            kept = [p[1:].tolist() for p in res.positions]
            encoder = res.traces
        else:
            request = method.request(fam.encoder_layers, fam.feature_layer)
            depth = max(
                [
                    *fls,
                    *request.hidden_states,
                    *(i + 1 for i in request.cls_attention),
                    *(i + 1 for i in request.keys),
                    *(i + 1 for i in request.attention_received),
                ]
            )
            with capture_encoder(layers, request, self._attention_parts, fls) as cap:
                self._run_tower(pixel_values, depth)
                features = torch.cat([cap.hidden_states[f][:, rows] for f in fls], dim=-1)
                if method.stage == POST_PROJECTOR:
                    features = self.multi_modal_projector(features)
                sels = grid_select(method, spec.k, cap, request, features, **grid)
            embeds = torch.stack(grid_outputs(sels, features))
            if method.stage == PRE_PROJECTOR:
                embeds = self.multi_modal_projector(embeds)
            kept, _ = selection_lists(sels, fam.num_prefix)  # one read for the batch
            encoder = self._full_trace(depth)
        if embeds.shape[1] != spec.k:  # the prompt holds k placeholders; anything else would corrupt the batch
            raise RuntimeError(f"tokensieve: {spec.method} returned {embeds.shape[1]} tokens for a budget of {spec.k}")
        self._record(spec, kept, encoder)
        return embeds
