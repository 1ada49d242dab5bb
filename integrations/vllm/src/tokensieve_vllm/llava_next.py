"""LLaVA-NeXT (anyres) under vLLM with tokensieve selecting each image's tokens crop by crop.

The same halves as :mod:`.llava`. What is NeXT's own:

* **The count before the encoder.** vLLM gives each image its placeholders in the front end, before anything is
  encoded. Under tokensieve's default newline policy ("rows": a grid row's ``image_newline`` stays when the row
  keeps a token) that count depends on which tokens win, so this architecture runs the two policies whose count is
  fixed by the image size and the budget alone (:mod:`tokensieve.engine.anyres`): ``"all"`` (default here; every
  newline stays, so keep-all is the stock model, and FasterVLM's official NeXT code keeps them) and ``"none"``
  (FlowCut's official multi-crop code inserts none). They equal ``Sieve(..., newlines="all" | "none")`` in
  transformers; "rows" is refused with this reason.
* **The layout is read off vLLM's own packing**: vLLM's ``_merge_image_patch_embeddings`` (unpadding, newlines) is
  run on crop-patch ids, in the front end for the count and in the engine for the selection, as the core adapter
  runs transformers' ``pack_image_features``; crops, shares and packing are :mod:`tokensieve.engine.anyres`, the code
  ``Sieve`` runs.
* **In-encoder methods are refused**: the encoder sees whole crops, and a kept patch that unpadding removes
  afterwards is dropped, so an image's count is only known after the encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from .compat import allow_without_torchvision

allow_without_torchvision()

from vllm.model_executor.models.llava import LlavaDummyInputsBuilder  # noqa: E402
from vllm.model_executor.models.llava_next import (  # noqa: E402
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from tokensieve.budget import Budget  # noqa: E402
from tokensieve.engine import anyres  # noqa: E402
from tokensieve.engine.capture import capture_encoder, check_finite  # noqa: E402
from tokensieve.errors import TokensieveError  # noqa: E402
from tokensieve.methods.base import Request  # noqa: E402
from tokensieve.plan import Target  # noqa: E402

from .common import (  # noqa: E402
    FIELD,
    bad_request,
    by_method,
    call_hf_processor,
    encode_specs,
    resolve_or_400,
)
from .llava import CLIP_NAMES, ClipTower, KPlaceholders  # noqa: E402
from .settings import SettingsError, SieveSpec, check_model_type, next_target  # noqa: E402

ARCH = "TokenSieveLlavaNextForConditionalGeneration"


def next_family(config) -> Target:
    """The facts settings are checked against: the core's LLaVA-NeXT facts, narrowed to what this plugin serves, with
    the most crops an image can have under this model's pinpoints (vLLM's own grid rule)."""
    check_model_type(ARCH, config)
    most = max(len(_crops_of(config, h, w)) for h, w in config.image_grid_pinpoints)
    return next_target(config, most)


def _crops_of(config, height: int, width: int) -> range:
    nph, npw = get_anyres_image_grid_shape(
        (height, width), config.image_grid_pinpoints, config.vision_config.image_size
    )
    return range(1 + nph * npw)


def packed_layout(config, height: int, width: int) -> anyres.Packed:
    """One image's packed layout, from vLLM's own packing run on crop-patch ids (newline id -1)."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    num_crops = len(_crops_of(config, height, width))
    host = SimpleNamespace(config=config, image_newline=torch.tensor([-1.0], dtype=torch.float64))
    ids = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
        host,
        torch.tensor([height, width]),
        anyres.crop_ids(num_crops, side * side),
        strategy="spatial_unpad",
    )
    return anyres.layout(ids, num_crops, side * side)


def _spec_of_image(settings, family: Target, config, height: int, width: int) -> SieveSpec | None:
    """One image's setting, its placeholder count ``k`` fixed by its layout, the budget and the newline policy."""
    spec = resolve_or_400(settings, family)
    if spec is None:
        return None
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    pk = packed_layout(config, height, width)
    try:
        budget = Budget.parse(spec.budget, spec.scope)
        k = anyres.num_tokens(pk, budget, side, side * side, spec.newlines)
    except TokensieveError as exc:
        raise bad_request(SettingsError(str(exc), "tokensieve_budget")) from None
    return SieveSpec(spec.method, k, int(pk.crop.numel()), spec.params, spec.budget, spec.scope, spec.newlines)


class TokenSieveLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    def family(self) -> Target:
        return next_family(self.get_hf_config())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}  # the full count: a request may keep everything


class TokenSieveLlavaNextMultiModalProcessor(KPlaceholders, LlavaNextMultiModalProcessor):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        settings, family, out = call_hf_processor(self, hf_data, hf_kwargs)
        sizes = out.get("image_sizes")
        if sizes is not None:
            config = self.info.get_hf_config()
            out[FIELD] = encode_specs([_spec_of_image(settings, family, config, int(h), int(w)) for h, w in sizes])
        return out


@MULTIMODAL_REGISTRY.register_processor(
    TokenSieveLlavaNextMultiModalProcessor,
    info=TokenSieveLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class TokenSieveLlavaNextForConditionalGeneration(ClipTower, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose images are compressed crop by crop by a tokensieve method before the LM."""

    hf_to_vllm_mapper = CLIP_NAMES | LlavaNextForConditionalGeneration.hf_to_vllm_mapper
    family_of = staticmethod(next_family)

    def embed_multimodal(self, **kwargs: object):
        image_input, specs = self._setting_input(kwargs)
        if image_input is None:
            return []
        if specs is None:
            return self._process_image_input(image_input)
        pixels = list(image_input["pixel_values"])  # [crops, 3, H, W] per image, stacked or not
        sizes = [tuple(int(x) for x in s) for s in image_input["image_sizes"].tolist()]
        out: list[torch.Tensor | None] = [None] * len(pixels)
        for idx in by_method(specs):  # images whose method and parameters agree run through CLIP together
            embeds = self._sieve([pixels[i] for i in idx], [sizes[i] for i in idx], [specs[i] for i in idx])
            for i, emb in zip(idx, embeds):
                out[i] = emb
        return out

    def _pack(self, size: tuple[int, int], patch_embeddings: torch.Tensor) -> torch.Tensor:
        return self._merge_image_patch_embeddings(torch.tensor(size), patch_embeddings, strategy="spatial_unpad")

    def _sieve(self, pixels: list[torch.Tensor], sizes: list[tuple[int, int]], specs: list[SieveSpec | None]):
        """Per image, its LM embeddings in packed order; images share one method and its parameters."""
        fam = self._family
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        layers = self.vision_tower.vision_model.encoder.layers
        fls = list(fam.feature_layers)
        counts = [p.shape[0] for p in pixels]
        packs = [packed_layout(self.config, h, w) for h, w in sizes]
        counts = [min(c, pk.num_crops) for c, pk in zip(counts, packs)]  # vLLM may pad crops for batching
        crops = torch.cat([p[:c] for p, c in zip(pixels, counts)])
        method = specs[0].build() if specs[0] is not None else None
        request = method.request(fam.encoder_layers, fam.feature_layer) if method is not None else Request()
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
            self._run_tower(crops, depth)
            pre = torch.cat([cap.hidden_states[f][:, 1:] for f in fls], dim=-1)  # patches ("default" drops CLS)
            check_finite(pre)
            projected = self.multi_modal_projector(pre)
            out, crop0 = [], 0
            for pk, size, spec, c in zip(packs, sizes, specs, counts):
                packed = self._pack(size, projected[crop0 : crop0 + c])
                if spec is None:
                    kept, feats = [int(x) for x in (pk.crop * side * side + pk.patch)[pk.crop >= 0].tolist()], packed
                else:
                    feats, kept, _, _ = anyres.select_image(
                        method,
                        Budget.parse(spec.budget, spec.scope),
                        request,
                        cap,
                        fls,
                        pre,
                        crop0,
                        pk,
                        packed,
                        side=side,
                        cls_offset=1,
                        num_layers=fam.encoder_layers,
                        attention=lambda cp, layer: cp.attention_row(layer, 0),
                        project=self.multi_modal_projector,
                        newlines=spec.newlines,
                    )
                    if feats.shape[0] != spec.k:  # the prompt holds k placeholders; anything else corrupts the batch
                        raise RuntimeError(
                            f"tokensieve: {spec.method} gave {feats.shape[0]} tokens where the prompt holds {spec.k}"
                        )
                crop0 += c
                out.append(feats)
                self._record(spec, [sorted(kept)], self._full_trace(depth))
        return out
