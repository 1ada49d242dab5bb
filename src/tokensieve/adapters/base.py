"""What every model family shares: turning a processor's batch into a compressed batch.

A family adapter supplies only the model-specific parts (where the encoder layers are, how features are produced,
how many placeholders an image has); the flow below (validate placeholders, encode and select, shrink each image's
placeholder run, re-pad, hand the kept features to the model through ``mm_encoder_outputs``) is common to all.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..budget import Budget, Scope
from ..engine.capture import TokenMeter
from ..engine.host import HostPrompt, to_device
from ..engine.placeholders import Compaction, ImageSpan, find_image_spans, shrink_placeholders
from ..errors import PlaceholderError, StageError
from ..methods.base import POST_PROJECTOR, PRE_PROJECTOR, Method
from ..plan import Target
from ..report import ImageReport, SieveReport

# per-token tensors that must follow input_ids when placeholders are removed, with the value for added padding
_PER_TOKEN_INPUTS = {"labels": -100, "position_ids": 0, "token_type_ids": 0, "mm_token_type_ids": 0}


@dataclass
class Encoded:
    """Kept features of every image, in the order the images were given."""

    features: list[torch.Tensor]
    images: list[ImageReport] = field(default_factory=list)
    encode_s: float = 0.0
    selection_s: float = 0.0
    encoder_layer_tokens: list[int] = field(default_factory=list)
    """Sequence length per image entering each encoder layer (see ``SieveReport.encoder_layer_tokens``)."""
    slots: list[list[int]] | None = None
    """Per image, which of its placeholders the kept features fill (ascending span indices). ``None``: the first
    ``len(features[i])``, right for families whose positions are re-indexed; families that keep original positions
    (M-RoPE) name the kept placeholders so each feature keeps its own position."""
    num_images: int | None = None
    """How many leading ``features`` are images; the rest are videos. ``None``: all are images."""


class Adapter(ABC):
    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    model_types: ClassVar[tuple[str, ...]] = ()
    """``config.model_type`` of each of ``model_classes``, in the same order."""
    display_names: ClassVar[tuple[str, ...]] = ()
    """How messages name each of ``model_classes``, in the same order."""
    scopes: ClassVar[tuple[Scope, ...]] = (Scope.IMAGE,)
    stages: ClassVar[tuple[str, ...]] = (PRE_PROJECTOR, POST_PROJECTOR)
    """Stages this family's adapter can run; in-encoder and in-LLM stages need family-specific sequence surgery
    (CLS, merge units, M-RoPE ids), so a family lists them only once they are implemented and tested."""
    signal_kinds: ClassVar[tuple[str, ...]] = ("hidden_states", "cls_attention", "keys", "cls_hidden")
    """``Request`` fields this family can fill (CLS-free towers fill ``cls_attention`` with their documented
    fallback)."""
    encoder_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    """Call arguments consumed by :meth:`encode`; they are not passed on to the language model."""
    visual_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    """Call arguments whose presence makes a call visual (and so compressed); text-only calls pass through."""
    newline_policies: ClassVar[tuple[str, ...]] = ()
    """Newline policies the family takes (``Sieve(..., newlines=)``), the default first; empty: no newline tokens."""

    def __init__(self, model) -> None:
        self.model = model

    @classmethod
    def matches(cls, model) -> bool:
        return type(model).__name__ in cls.model_classes

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def video_token_id(self) -> int | None:
        video = getattr(self.model.config, "video_token_id", None)
        return None if video is None else int(video)

    @property
    def placeholder_token_ids(self) -> tuple[int, ...]:
        """Every token id that stands for a visual token (image, video) in ``input_ids``."""
        return (self.image_token_id,) if self.video_token_id is None else (self.image_token_id, self.video_token_id)

    def is_visual(self, kwargs: dict[str, Any]) -> bool:
        return any(kwargs.get(name) is not None for name in self.visual_inputs)

    def tokens_per_video(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        """Placeholders each video occupies (families whose videos have their own ``video_token_id``)."""
        return []

    def find_spans(self, prompt, encoder_kwargs: dict[str, Any]) -> list[ImageSpan]:
        """Placeholder runs in the order :meth:`encode` returns features: images, then videos.

        ``prompt``: the call's :class:`~tokensieve.engine.host.HostPrompt` (``input_ids`` is read once if given)."""
        if isinstance(prompt, torch.Tensor):
            prompt = HostPrompt.of(prompt)
        spans = find_image_spans(prompt, self.image_token_id, self.tokens_per_image(encoder_kwargs))
        per_video = self.tokens_per_video(encoder_kwargs)
        if per_video:
            videos = find_image_spans(prompt, self.video_token_id, per_video)
            for span in videos:
                span.image += len(spans)
            spans += videos
        return spans

    def video_output(self, features: list[torch.Tensor]):
        """Kept video features in the form the model's ``mm_encoder_outputs["video"]`` takes (a list by default)."""
        return features

    def encoder_outputs(self, encoded: Encoded) -> dict[str, BaseModelOutputWithPooling]:
        """The ``mm_encoder_outputs`` argument that hands the kept features to the model."""
        n_img = len(encoded.features) if encoded.num_images is None else encoded.num_images
        out = {}
        if n_img:
            out["image"] = BaseModelOutputWithPooling(pooler_output=encoded.features[:n_img])
        if len(encoded.features) > n_img:
            out["video"] = BaseModelOutputWithPooling(pooler_output=self.video_output(encoded.features[n_img:]))
        return out

    @property
    def num_layers(self) -> int:
        """Layers of the vision encoder."""
        raise NotImplementedError

    def vision_modules(self) -> tuple:
        """``(vision tower, projector)``: the first forward of one and the last of the other bound a call's vision
        time (``tokensieve.tools.measure``)."""
        raise NotImplementedError

    def meter_parts(self) -> tuple:
        """``(encoder layers, projector modules, pooling head or None, segment reader)`` for the call's
        :class:`~tokensieve.engine.capture.TokenMeter` (the token trace FLOPs are priced from)."""
        raise NotImplementedError

    # -- what the rule set checks a setting against (tokensieve.plan) ------------------------------------------
    @classmethod
    def _variant(cls, config) -> int:
        model_type = getattr(config, "model_type", None)
        return cls.model_types.index(model_type) if model_type in cls.model_types else 0

    @classmethod
    def model_class(cls, config) -> str:
        """The transformers class a config belongs to (``model_types`` and ``model_classes`` pair up)."""
        return cls.model_classes[cls._variant(config)]

    @classmethod
    def display_name(cls, config) -> str:
        """The model family as messages name it (``LLaVA-1.5``, ``Qwen2.5-VL``)."""
        return cls.display_names[cls._variant(config)]

    @classmethod
    def encoder_layers_of(cls, config) -> int:
        """Layers of the vision encoder, read off the config."""
        return int(config.vision_config.num_hidden_layers)

    @classmethod
    def feature_layers_of(cls, config) -> tuple[int, ...]:
        """Non-negative ``hidden_states`` indices the features are made of; by default the encoder's last layer
        (Qwen-VL's merger and Idefics3's connector read it)."""
        return (cls.encoder_layers_of(config),)

    @classmethod
    def limits_of(cls, config) -> dict[Scope, int]:
        """The most tokens one unit of a scope has, where the config alone fixes it (see ``plan.Target.limits``)."""
        return {}

    @classmethod
    def prefix_of(cls, config) -> int:
        """Leading candidates that are not patches (LLaVA's CLS under the ``full`` strategy)."""
        return 0

    @classmethod
    def describe(cls, config, model: str | None = None) -> Target:
        """This family's facts for a config, as the rule set reads them; a host that runs less of the model
        (the vLLM plugin) narrows them (``Target.narrowed``)."""
        return Target(
            family=cls.display_name(config),
            model=model or cls.model_class(config),
            encoder_layers=cls.encoder_layers_of(config),
            feature_layers=tuple(cls.feature_layers_of(config)),
            llm_layers=int(config.get_text_config().num_hidden_layers),
            stages=cls.stages,
            scopes=cls.scopes,
            signal_kinds=cls.signal_kinds,
            limits=cls.limits_of(config),
            num_prefix=cls.prefix_of(config),
            newlines=cls.newline_policies,
        )

    def target(self) -> Target:
        """:meth:`describe` for this model instance."""
        return self.describe(self.model.config, type(self.model).__name__)

    def llm_targets(self, budget: Budget, images: list) -> list[int]:
        """Per report entry, the layer-averaged visual tokens an in-LLM method may keep, read by the budget's scope.

        The pre-LLM scopes carry over: a ratio applies to each entry; an int is per image, per crop with scope
        ``crop`` (anyres images span several), per frame for videos (the default for frames, as before the LM), and
        with ``global`` per whole image or video, its crops or frames together.
        """
        out: list[int] = []
        for i, im in enumerate(images):
            n = im.tokens_out
            what = f"{'video' if im.frames else 'image'} {i} entering the LM"
            if n == 0 or budget.is_ratio or budget.scope == Scope.GLOBAL:
                out.append(budget.resolve(n, what=what) if n else 0)
                continue
            units = im.frames if im.frames else (im.crops if budget.scope == Scope.CROP else 1)
            out.append(Budget(int(budget.value) * units, budget.scope).resolve(n, what=what))
        return out

    def decoder_layers(self):
        """The language model's decoder layers, where in-LLM stages hook."""
        return self.model.get_decoder().layers

    def llm_parts(self, layer):
        """How to score with one decoder layer; families whose layers differ from Llama's override this."""
        return llama_style_parts(layer)

    def final_norm(self):
        """The language model's final norm (applied after its last decoder layer), for in-LLM methods that compare
        hidden states in that space (DART); Llama- and Qwen2-style LMs call it ``norm``."""
        norm = getattr(self.model.get_decoder(), "norm", None)
        if norm is None:
            raise StageError(f"cannot find the final norm of the {self.family} language model (no `norm` module)")
        return norm

    @abstractmethod
    def tokens_per_image(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        """Placeholders each image occupies in the uncompressed prompt."""

    @abstractmethod
    def encode(
        self, method: Method, budget: Budget, encoder_kwargs: dict[str, Any], spans: list[ImageSpan] | None = None
    ) -> Encoded:
        """Run the vision side with ``method`` selecting, return the kept features of every image.

        ``spans``: this call's placeholder runs (:meth:`find_spans`), for families that read the prompt's grouping
        of runs into images; what one call learns is passed along, never kept on the adapter."""

    def pad_token_id(self, prompt: HostPrompt) -> int:
        """A pad id for re-padding: the one the processor used if visible, otherwise the config's."""
        if prompt.mask is not None:
            for row, mask in zip(prompt.ids, prompt.mask):
                for t, m in zip(row, mask):
                    if m == 0:
                        return t
        text_cfg = self.model.config.get_text_config()
        for cand in (getattr(text_cfg, "pad_token_id", None), getattr(self.model.config, "pad_token_id", None)):
            if cand is not None and int(cand) != self.image_token_id:
                return int(cand)
        return 0 if self.image_token_id != 0 else 1

    def carry_inputs(self, kwargs: dict[str, Any], comp: Compaction, input_ids: torch.Tensor) -> None:
        """Make the other per-token inputs follow the shrunk prompt.

        The default gathers [B, L, ...] tensors; families whose positions are not [B, L] (M-RoPE's [3, B, L])
        override this.
        """
        for name, pad in _PER_TOKEN_INPUTS.items():
            t = kwargs.get(name)
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(input_ids.shape):
                kwargs[name] = comp.apply(t, pad)

    def text_report(self, kwargs: dict[str, Any], method: Method, budget: Budget, method_name: str) -> SieveReport:
        """The report of a call without visual input: nothing was compressed, the LM saw every token."""
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        shape = (
            tuple(ids.shape[:2])
            if isinstance(ids, torch.Tensor) and ids.dim() >= 2
            else (tuple(embeds.shape[:2]) if isinstance(embeds, torch.Tensor) and embeds.dim() >= 3 else None)
        )
        if shape is None:
            real, length = [], 0
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == shape:
            real, length = [int(n) for n in mask.sum(dim=1).tolist()], shape[1]
        else:
            real, length = [shape[1]] * shape[0], shape[1]
        layers = int(self.model.config.get_text_config().num_hidden_layers)
        return SieveReport(
            method=method_name,
            budget=str(budget),
            scope=budget.scope.value,
            stage=method.stage,
            visual_input=False,
            seq_len_in=length,
            seq_len_out=length,
            kept_positions=[torch.arange(length) for _ in real],
            input_ids=ids if isinstance(ids, torch.Tensor) else None,
            attention_mask=mask if isinstance(mask, torch.Tensor) else None,
            llm_layer_tokens=[[n] * layers for n in real],
            llm_layer_visual_tokens=[[0] * layers for _ in real],
        )

    def prepare(self, kwargs: dict[str, Any], method: Method, budget: Budget, method_name: str, left_pad: bool = False):
        """Rewrite a call's keyword arguments; returns ``(new_kwargs, report)``, report ``None`` for text-only calls.

        ``left_pad``: re-pad the shrunk batch on the left whatever the caller's padding side (``generate()``, which
        continues every row after its last slot); otherwise on the caller's side, so ``forward()`` logits keep it.
        """
        encoder_kwargs = {k: kwargs.pop(k) for k in self.encoder_inputs if k in kwargs}
        if not self.is_visual(encoder_kwargs):
            kwargs.update({k: v for k, v in encoder_kwargs.items() if v is not None and k not in self.visual_inputs})
            return kwargs, None
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise PlaceholderError(
                "tokensieve needs input_ids to find the image placeholders; inputs_embeds alone cannot be compressed"
            )
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise PlaceholderError(
                f"tokensieve needs a 2-D [batch, seq] attention_mask to shrink the prompt, got shape "
                f"{tuple(attention_mask.shape)}"
            )
        prompt = HostPrompt.of(input_ids, attention_mask)  # the call's one read of the prompt
        spans = self.find_spans(prompt, encoder_kwargs)
        with TokenMeter(*self.meter_parts()) as meter:
            encoded = self.encode(method, budget, encoder_kwargs, spans)
        for span, im in zip(spans, encoded.images):
            im.sample = span.sample
        kept = encoded.slots if encoded.slots is not None else [int(f.shape[0]) for f in encoded.features]
        comp = shrink_placeholders(prompt, spans, kept, left=True if left_pad else None, device=input_ids.device)
        pad_id = self.pad_token_id(prompt)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        host_mask = prompt.mask if prompt.mask is not None else [[1] * len(r) for r in prompt.ids]
        new_ids = comp.apply(input_ids, pad_id)
        owner = [[-1] * len(r) for r in prompt.ids]  # which of its sample's visual entries each slot belongs to
        ordinal: dict[int, int] = {}
        for span in spans:
            j = ordinal.setdefault(span.sample, 0)
            for p in span.positions:
                owner[span.sample][p] = j
            ordinal[span.sample] += 1
        new_owner = comp.apply_host(owner, -1)
        new_host_ids = comp.apply_host(prompt.ids, pad_id)
        new_host_mask = comp.apply_host(host_mask, 0)
        new_mask = comp.apply(attention_mask, 0)
        kwargs["input_ids"] = new_ids
        kwargs["attention_mask"] = new_mask
        self.carry_inputs(kwargs, comp, input_ids)
        kwargs["mm_encoder_outputs"] = self.encoder_outputs(encoded)
        num_llm_layers = int(self.model.config.get_text_config().num_hidden_layers)
        placeholders = set(self.placeholder_token_ids)
        real = [sum(1 for m in row if m) for row in new_host_mask]
        visual = [
            sum(1 for t, m in zip(ids, row) if m and t in placeholders) for ids, row in zip(new_host_ids, new_host_mask)
        ]
        report = SieveReport(
            method=method_name,
            budget=str(budget),
            scope=budget.scope.value,
            stage=method.stage,
            images=encoded.images,
            encode_s=encoded.encode_s,
            selection_s=encoded.selection_s,
            seq_len_in=int(input_ids.shape[1]),
            seq_len_out=int(new_ids.shape[1]),
            kept_positions=comp.kept_positions,
            input_ids=new_ids,
            attention_mask=new_mask,
            visual_index=to_device(new_owner, input_ids.device),
            host_visual_index=new_owner,
            host_attention_mask=new_host_mask,
            encoder_layer_tokens=list(encoded.encoder_layer_tokens),
            encoder_layer_segments=meter.segments,
            projected_tokens=meter.projected,
            encoder_head_tokens=meter.head_tokens,
            llm_layer_tokens=[[int(n)] * num_llm_layers for n in real],
            llm_layer_visual_tokens=[[int(n)] * num_llm_layers for n in visual],
        )
        return kwargs, report


# -- in-LLM stage support (kept apart from the encode path above) ----------------------------------------------------
def llama_style_parts(layer):
    """Scoring parts of a Llama/Qwen2/Mistral-style decoder layer (``input_layernorm`` + ``self_attn`` projections)."""
    from ..engine.llm_stage import LLMParts

    attn = layer.self_attn
    cfg = attn.config
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    return LLMParts(
        norm=layer.input_layernorm,
        q_proj=attn.q_proj,
        k_proj=attn.k_proj,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=int(attn.head_dim),
        scaling=float(attn.scaling),
        q_norm=getattr(attn, "q_norm", None),
        k_norm=getattr(attn, "k_norm", None),
    )


def now() -> float:
    return time.perf_counter()
