"""Qwen2.5-VL under vLLM with tokensieve selecting each image's merge units; kept tokens keep their M-RoPE ids.

The same halves as :mod:`.llava`, plus positions:

* **Candidates are merge units**, one LM token each, as in tokensieve's own Qwen adapter: the engine runs vLLM's
  ViT with hooks that read the per-patch signals a method asks for (block outputs, q/k with the vision RoPE, the
  merger's input), puts them back in the processor's raster order (the ViT runs on a window-permuted sequence) and
  hands them to :func:`tokensieve.engine.merge_units.select_units`, the function the ``Sieve`` path calls. Pre-projector
  methods select on the merger's input and are projected by vLLM's merger; post-projector ones on its output.
* **Placeholders.** An image's count depends on its size (``grid_thw``), so the budget is resolved per image in
  the front end (an int above that image's count is a 400), and the image gets ``k`` placeholders.
* **Positions.** tokensieve keeps the original M-RoPE ids of kept tokens (those of the full grid), and the text
  after an image where it would be after the full image. vLLM computes a request's positions when it is scheduled,
  before the encoder ran, from the placeholders: :meth:`get_mrope_input_positions` gives text its final positions
  and every placeholder of an image the position of the image's first unit. The kept units' (t, h, w) offsets
  travel with their embeddings as 3 trailing channels; :meth:`embed_input_ids` strips them and
  :meth:`forward` adds them to the positions of the image slots of that step (chunked prefill slices embeddings
  and slots alike). vLLM's own route for this, ``SupportsMultiModalPruning.recompute_mrope_positions`` (EVS), is
  not used: the runner calls it only when ``video_pruning_rate`` is set, and the CPU runner never does.
  Pipeline parallelism is refused (the offsets live on the first rank).
* **Images only.** transformers builds no Qwen video processor without torchvision (and none installs next to CPU
  torch here), so the front end refuses videos with a clear error; without torchvision the processor is built
  image-only (:class:`ImageOnlyQwen2_5_VLProcessor`).
* **In-encoder methods are refused**: tokensieve's Qwen cutter drives transformers' ViT blocks (rotary re-cut,
  ``cu_seqlens`` per window); it has not been ported to vLLM's block interface.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import lru_cache

import torch

from .compat import allow_without_torchvision, has_torchvision

allow_without_torchvision()  # before vLLM's qwen2_vl module is imported (it is also done in register())

from transformers import AutoImageProcessor  # noqa: E402
from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.model_executor.models.qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.inputs import MultiModalKwargsItems  # noqa: E402
from vllm.multimodal.parse import MultiModalDataItems  # noqa: E402
from vllm.multimodal.processing import PromptReplacement, PromptUpdate  # noqa: E402

from tokensieve.engine.merge_units import UnitSignals, select_units  # noqa: E402
from tokensieve.methods.base import Request  # noqa: E402
from tokensieve.plan import Target  # noqa: E402

from .common import (  # noqa: E402
    FIELD,
    TRACE_ENV,
    SettingField,
    by_method,
    call_hf_processor,
    check_engine,
    decode_spec,
    encode_specs,
    item_spec,
    record,
    resolve_or_400,
)
from .settings import SieveSpec, qwen_target  # noqa: E402

ARCH = "TokenSieveQwen2_5_VLForConditionalGeneration"
POSITION_CHANNELS = 3
"""(t, h, w) offsets of a kept unit within its image, appended to its embedding."""


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's HF processor without a video processor.

    transformers 5.x cannot construct ``Qwen2_5_VLProcessor`` at all without torchvision (the video processor
    class, and even the check that a sub-processor has the right class, need it). Images need only the image
    processor and the tokenizer, so this class accepts ``video_processor=None``; videos are refused before they
    reach it.
    """

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@lru_cache(maxsize=8)
def _image_only_processor(model: str, revision: str | None, tokenizer) -> ImageOnlyQwen2_5_VLProcessor:
    image_processor = AutoImageProcessor.from_pretrained(model, revision=revision)
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=getattr(tokenizer, "chat_template", None),
    )


class TokenSieveQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def family(self) -> Target:
        return qwen_target(self.get_hf_config(), self.get_max_image_tokens())

    def get_hf_processor(self, **kwargs: object) -> Qwen2_5_VLProcessor:
        if has_torchvision():
            return super().get_hf_processor(**kwargs)
        cfg = self.ctx.model_config
        return _image_only_processor(cfg.model, cfg.revision, self.get_tokenizer())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def parse_mm_data(self, mm_data, *, validate: bool = True):
        if mm_data.get("video") is not None:  # before vLLM's own parsing, which asks for video metadata first
            raise VLLMValidationError(
                f"tokensieve: {ARCH} serves images only; videos are refused (transformers builds no Qwen video "
                "processor without torchvision, and the plugin's video path is not written). Serve videos under "
                "the stock architecture",
                parameter="video",
            )
        return super().parse_mm_data(mm_data, validate=validate)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # the full grid, whatever the server default: a request may ask for every token
        return {"image": self.get_max_image_tokens()}


class TokenSieveQwen2_5_VLMultiModalProcessor(SettingField, Qwen2_5_VLMultiModalProcessor):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        settings, family, out = call_hf_processor(self, hf_data, hf_kwargs)
        grid = out.get("image_grid_thw")
        if grid is not None:
            unit = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
            out[FIELD] = encode_specs([resolve_or_400(settings, family, int(g.prod()) // unit) for g in grid])
        return out

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        unit = config.vision_config.spatial_merge_size**2

        def replacement(item_idx: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            spec = item_spec(out_mm_kwargs, "image", item_idx)
            return [config.image_token_id] * (spec.k if spec is not None else int(grid.prod()) // unit)

        return [PromptReplacement(modality="image", target=[config.image_token_id], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    TokenSieveQwen2_5_VLMultiModalProcessor,
    info=TokenSieveQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TokenSieveQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose images are compressed by a tokensieve method before they reach the LM."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        qwen_target(config, 1)  # model type first: the real token count needs the processor
        if vllm_config.model_config.get_multimodal_config().is_multimodal_pruning_enabled():
            raise ValueError(f"{ARCH} does not run with EVS (video_pruning_rate); it serves images only")
        pp = vllm_config.parallel_config.pipeline_parallel_size
        if pp != 1:
            raise ValueError(
                f"{ARCH} runs with pipeline_parallel_size=1 only (got {pp}): kept tokens' positions "
                "are set on the first rank"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # an image's token count depends on its size: budgets are checked per image in the front end
        self._family = qwen_target(config, 1 << 30)
        check_engine(vllm_config, self._family)
        self._trace = os.environ.get(TRACE_ENV)
        self._offsets: tuple[torch.Tensor, torch.Tensor] | None = None  # (image slots, their (t, h, w) offsets)

    # -- positions -----------------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """Positions of the shrunk prompt: text where it is in the full prompt (after an image: its first position
        + max(h, w) of the full grid, as Qwen's ``get_rope_index``), every slot of an image at the image's first
        position; :meth:`forward` adds each kept unit's offset."""
        merge = self.config.vision_config.spatial_merge_size
        pieces, st, nxt = [], 0, 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if f.modality != "image":
                raise ValueError(f"{ARCH} serves images only, got {f.modality}")
            offset, length = f.mm_position.offset, f.mm_position.length
            _, h, w = (int(x) for x in f.data["image_grid_thw"].data.tolist())
            pieces.append(torch.arange(offset - st).expand(3, -1) + nxt)
            base = nxt + offset - st
            pieces.append(torch.full((3, length), base))
            nxt = base + max(h, w) // merge
            st = offset + length
        if st < len(input_tokens):
            pieces.append(torch.arange(len(input_tokens) - st).expand(3, -1) + nxt)
        positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        return positions, int(positions.max()) + 1 - len(input_tokens) if positions.numel() else 0

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        """Strip the offset channels off this step's image embeddings and keep them for :meth:`forward`."""
        self._offsets = None
        if multimodal_embeddings is not None and len(multimodal_embeddings) and is_multimodal is not None:
            offsets = torch.cat([e[:, -POSITION_CHANNELS:] for e in multimodal_embeddings]).round().long()
            multimodal_embeddings = [e[:, :-POSITION_CHANNELS] for e in multimodal_embeddings]
            self._offsets = (is_multimodal.nonzero().flatten(), offsets)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self._offsets is not None:
            slots, offsets = self._offsets
            self._offsets = None
            if slots.numel() != offsets.shape[0] or positions.dim() != 2:
                raise RuntimeError(f"tokensieve: {slots.numel()} image slots but {offsets.shape[0]} position offsets")
            positions = positions.clone()
            positions[:, slots.to(positions.device)] += offsets.t().to(positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    @staticmethod
    def _positions(where: torch.Tensor, wu: int, like: torch.Tensor) -> torch.Tensor:
        """[k, 3] offsets (t, h, w) of kept units ``where`` (raster ids of the full grid, ``wu`` units a row)."""
        cols = [torch.zeros_like(where), where // wu, where % wu]
        return torch.stack(cols, dim=1).to(device=like.device, dtype=like.dtype)

    # -- engine side ---------------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise ValueError(f"{ARCH} serves images only")
        raw = kwargs.pop(FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        grid = image_input["image_grid_thw"]
        merge = self.visual.spatial_merge_size
        if image_input["type"] != "pixel_values":  # precomputed embeddings: every unit, full-grid positions
            embeds = self._process_image_input(image_input)
            return [
                torch.cat([e, self._positions(torch.arange(e.shape[0]), int(g[2]) // merge, e)], 1)
                for e, g in zip(embeds, grid.tolist())
            ]
        pixels = image_input["pixel_values"]
        grids = [tuple(int(x) for x in g) for g in grid.tolist()]
        starts = torch.tensor([0] + [t * h * w for t, h, w in grids]).cumsum(0).tolist()
        specs = [decode_spec(row) for row in raw] if raw is not None else [None] * len(grids)
        out: list[torch.Tensor | None] = [None] * len(grids)
        for idx in by_method(specs):  # images whose method and parameters agree run through the ViT together
            pv = torch.cat([pixels[starts[i] : starts[i + 1]] for i in idx])
            for i, emb in zip(idx, self._sieve(pv, [grids[i] for i in idx], [specs[i] for i in idx])):
                out[i] = emb
        return out

    def _project(self, units: torch.Tensor) -> torch.Tensor:
        """vLLM's merger on already-gathered units [n, 4*d] (its norm per patch, then its MLP)."""
        merger = self.visual.merger
        d = units.shape[-1] // self.visual.spatial_merge_unit
        return merger.mlp(merger.ln_q(units.reshape(-1, d)).view(-1, merger.hidden_size))

    def _run(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]], request: Request) -> UnitSignals:
        """One ViT forward with capture; the per-patch signals in raster order.

        vLLM's vision blocks and merger are called through its compile wrapper, which calls ``forward`` directly
        (no module hooks), so the hooks sit on modules inside them: a block's input is read at its ``norm1`` (the
        hidden state after the block before it), the last block's output and the merger's input at ``merger.ln_q``,
        q/k at ``attn``. Inputs are cloned: vLLM's fused add-norm later writes into the block input in place.
        """
        visual = self.visual
        unit = visual.spatial_merge_unit
        depth = len(visual.blocks)
        attn_layers = sorted(set(request.cls_attention) | set(request.keys) | set(request.attention_received))
        raw: dict[int, tuple] = {}
        seen: dict[int, torch.Tensor] = {}
        handles = []
        for layer in attn_layers:

            def pre(mod, args, kw, _l=layer):
                raw[_l] = (args[0] if args else kw["x"], kw["rotary_pos_emb_cos"], kw["rotary_pos_emb_sin"])

            handles.append(visual.blocks[layer].attn.register_forward_pre_hook(pre, with_kwargs=True))
        for i in sorted(set(request.hidden_states) | {depth}):
            if not 0 <= i <= depth:
                raise ValueError(f"hidden_states index {i} outside 0..{depth}")
            mod = visual.blocks[i].norm1 if i < depth else visual.merger.ln_q
            handles.append(mod.register_forward_pre_hook(lambda m, args, _i=i: seen.__setitem__(_i, args[0].clone())))
        try:
            merged = visual(pixels, grid_thw=[list(g) for g in grids])
        finally:
            for h in handles:
                h.remove()
        window = visual.prepare_encoder_metadata([list(g) for g in grids])["window_index"].cpu()
        order = (window[:, None] * unit + torch.arange(unit)).flatten()  # row r holds patch order[r]

        def raster(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(x.shape[0], *x.shape[2:]) if x.dim() > 2 and x.shape[1] == 1 else x  # [s, 1, ...] rows
            y = torch.empty_like(x)
            y[order.to(x.device)] = x
            return y

        qk = {}
        for layer, (x, cos, sin) in raw.items():
            attn = visual.blocks[layer].attn
            y, _ = attn.qkv(x)
            heads, hd = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
            q, k, _ = y.reshape(y.shape[0], 3, heads, hd).unbind(1)  # [P, H, hd]
            rot = attn.apply_rotary_emb(torch.stack([q, k]).float().contiguous(), cos.float(), sin.float())
            qk[layer] = (raster(rot[0]), raster(rot[1]), raster(k), hd**-0.5)
        hidden = {i: raster(seen[i]) for i in request.hidden_states}
        return UnitSignals(raster(seen[depth]), merged, hidden, qk)

    def _sieve(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]], specs: list[SieveSpec | None]):
        """Per image: its k LM embeddings with the 4 position channels appended."""
        merge = self.visual.spatial_merge_size
        spec0 = specs[0]
        depth = len(self.visual.blocks)
        if spec0 is None:
            merged = self.visual(pixels, grid_thw=[list(g) for g in grids])
            out, kept, start = [], [], 0
            for t, h, w in grids:
                n = t * (h // merge) * (w // merge)
                where = torch.arange(n)
                out.append(torch.cat([merged[start : start + n], self._positions(where, w // merge, merged)], 1))
                kept.append(where.tolist())
                start += n
            record(self._trace, None, kept, [sum(t * h * w for t, h, w in grids) // len(grids)] * depth)
            return out
        method = spec0.build()
        request = method.request(depth, depth)
        sig = self._run(pixels, grids, request)
        if not bool(torch.isfinite(sig.merged).all()):
            raise ValueError("tokensieve: vision features contain NaN or Inf; check the model dtype")
        out, offset = [], 0
        for (t, h, w), spec in zip(grids, specs):
            feats, where, _, _ = select_units(
                method,
                spec.k,
                request,
                sig,
                thw=(t, h, w),
                patch_offset=offset,
                merge=merge,
                frames=1,
                num_layers=depth,
                project=self._project,
            )
            offset += t * h * w
            if feats.shape[0] != spec.k:  # the prompt holds k placeholders; anything else would corrupt the batch
                raise RuntimeError(
                    f"tokensieve: {spec.method} returned {feats.shape[0]} tokens for a budget of {spec.k}"
                )
            out.append(torch.cat([feats, self._positions(where, w // merge, feats)], 1))
            record(self._trace, spec, [where.tolist()], [t * h * w] * depth)
        return out
