"""Removable hooks that capture encoder signals during one vision forward.

Signals are read from the encoder's own computation instead of a second pass: hidden states from layer outputs,
queries and keys from the outputs of ``q_proj``/``k_proj``. CLS-attention rows are then computed from those q/k
(O(N) per flagged layer), so the encoder keeps running on SDPA or FlashAttention and nothing model-wide switches to
eager attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NonFiniteFeaturesError
from ..methods.base import Layout, Request, Signals
from .attention import received_attention


@dataclass(frozen=True)
class AttentionParts:
    """How to read one encoder layer's attention: projections and head geometry.

    Separate ``q_proj`` / ``k_proj`` / ``v_proj`` (transformers), or one fused ``qkv_proj`` whose output (its first
    element when the module returns a tuple, as vLLM's parallel linear layers do) is q, k and v concatenated on the
    last dimension, ``num_heads * head_dim`` each (vLLM's towers; leave the separate ones ``None`` then).
    """

    q_proj: nn.Module | None
    k_proj: nn.Module | None
    num_heads: int
    head_dim: int
    scale: float
    v_proj: nn.Module | None = None
    qkv_proj: nn.Module | None = None


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def hook_projections(parts: AttentionParts, wanted, store, what: str = "the encoder layer") -> list:
    """Forward hooks that hand the q / k / v projection outputs named in ``wanted`` to ``store(name, tensor)``.

    A fused projection is hooked once and split, so callers see the same [B, T, H * head_dim] tensors either way.
    Returns the hook handles; the caller removes them.
    """
    wanted = set(wanted)
    if not wanted:
        return []
    if parts.qkv_proj is not None:
        width = parts.num_heads * parts.head_dim

        def fused(mod, args, out):
            x = _first(out)
            if x.shape[-1] != 3 * width:
                raise ValueError(
                    f"fused qkv projection of {what} gives {x.shape[-1]} features, expected 3 x {parts.num_heads} "
                    f"heads x {parts.head_dim}"
                )
            for name, t in zip(("q", "k", "v"), x.split(width, dim=-1)):
                if name in wanted:
                    store(name, t)

        return [parts.qkv_proj.register_forward_hook(fused)]
    handles = []
    for name in ("q", "k", "v"):
        if name not in wanted:
            continue
        mod = getattr(parts, f"{name}_proj")
        if mod is None:
            raise ValueError(f"{name}_proj of {what} is unknown")
        handles.append(mod.register_forward_hook(lambda m, a, out, _n=name: store(_n, _first(out))))
    return handles


class Captured:
    """Storage filled by the hooks of :func:`capture_encoder`."""

    def __init__(self) -> None:
        self.hidden_states: dict[int, torch.Tensor] = {}
        self.queries: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self._parts: dict[int, AttentionParts] = {}

    def split_heads(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """[B, T, H*hd] -> [B, H, T, hd]."""
        p = self._parts[layer]
        b, t, _ = x.shape
        return x.view(b, t, p.num_heads, p.head_dim).transpose(1, 2)

    def scale(self, layer: int) -> float:
        """The attention scale of ``layer``."""
        return self._parts[layer].scale

    def key_heads(self, layer: int) -> torch.Tensor:
        return self.split_heads(self.keys[layer], layer)

    def attention_row(self, layer: int, row: int = 0) -> torch.Tensor:
        """Softmax attention of query ``row`` over all keys of ``layer``: [B, H, T], in float32.

        Equal to the row of the eager attention map (the vision encoders handled here use no attention mask).
        """
        p = self._parts[layer]
        q = self.split_heads(self.queries[layer][:, row : row + 1], layer).float()  # [B, H, 1, hd]
        k = self.key_heads(layer).float()  # [B, H, T, hd]
        logits = (q @ k.transpose(-1, -2)).squeeze(-2) * p.scale
        return logits.softmax(dim=-1)

    def attention_received(self, layer: int, chunk: int = 128) -> torch.Tensor:
        """Attention each key receives, averaged over heads and all query rows: [B, T], float32.

        Needs the whole attention map of one layer, so query rows go in chunks: memory stays O(chunk * T) per head
        instead of O(T^2), and nothing outside this layer changes implementation.
        """
        q = self.split_heads(self.queries[layer], layer).float()
        k = self.key_heads(layer).float()
        total = received_attention(q, k, self._parts[layer].scale, chunk=chunk, sum_heads=True)
        return total / (q.shape[2] * q.shape[1])


@contextmanager
def capture_encoder(
    layers: Sequence[nn.Module], request: Request, attention_parts, extra_hidden: Sequence[int] = ()
) -> Iterator[Captured]:
    """Capture what ``request`` asks for while the body runs the encoder; hooks are removed on exit, always.

    ``attention_parts(layer_module) -> AttentionParts`` is supplied by the adapter, so this module knows nothing
    about any model family. ``extra_hidden`` adds hidden_states indices the adapter itself needs (e.g. the feature
    layer for the CLS hidden state).
    """
    cap = Captured()
    handles = []
    num_layers = len(layers)
    wanted_hidden = sorted(set(request.hidden_states) | set(extra_hidden))
    for idx in wanted_hidden:
        if not 0 <= idx <= num_layers:
            raise ValueError(f"hidden_states index {idx} outside 0..{num_layers}")
    query_layers = set(request.cls_attention) | set(request.attention_received)
    attn_layers = sorted(query_layers | set(request.keys))
    for idx in attn_layers:
        if not 0 <= idx < num_layers:
            raise ValueError(f"encoder layer {idx} outside 0..{num_layers - 1}")
    try:
        for idx in wanted_hidden:
            if idx == 0:

                def pre(mod, args, kwargs, _i=idx):
                    cap.hidden_states[_i] = args[0] if args else kwargs["hidden_states"]

                handles.append(layers[0].register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(mod, args, out, _i=idx):
                    cap.hidden_states[_i] = _first(out)

                handles.append(layers[idx - 1].register_forward_hook(post))
        for idx in attn_layers:
            parts = attention_parts(layers[idx])
            cap._parts[idx] = parts

            def store(name, t, _i=idx):
                (cap.queries if name == "q" else cap.keys)[_i] = t

            handles += hook_projections(
                parts, {"q", "k"} if idx in query_layers else {"k"}, store, f"encoder layer {idx}"
            )
        yield cap
    finally:
        for h in handles:
            h.remove()


def check_finite(features: torch.Tensor) -> None:
    """Refuse [B, ...] features with NaN or Inf: no ranking of them means anything."""
    finite = torch.isfinite(features).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise NonFiniteFeaturesError(
            f"vision features of image(s) {bad} contain NaN or Inf; check pixel_values and the model dtype"
        )


def grid_signals(
    cap: Captured,
    request: Request,
    features: torch.Tensor,
    layout: Layout,
    num_layers: int,
    feature_layer: int,
    feature_layers: Sequence[int],
    rows: slice,
) -> Signals:
    """The signals ``request`` names for a single-grid tower whose candidates are ``rows`` of every captured
    sequence (LLaVA-1.5's CLIP: the patches, plus CLS under the ``full`` strategy).

    ``feature_layers``: hidden_states indices concatenated into the features; the CLS hidden state is taken from
    them the same way, so it lives in the features' space. Shared by the transformers adapter and the vLLM
    integration, so both hand a method the same tensors.
    """
    return Signals(
        features=features,
        layout=layout,
        num_layers=num_layers,
        feature_layer=feature_layer,
        hidden_states={i: cap.hidden_states[i][:, rows] for i in request.hidden_states},
        cls_attention={i: cap.attention_row(i, 0)[:, :, rows] for i in request.cls_attention},
        keys={i: cap.key_heads(i)[:, :, rows] for i in request.keys},
        attention_received={i: cap.attention_received(i)[:, rows] for i in request.attention_received},
        cls_hidden=torch.cat([cap.hidden_states[i][:, 0] for i in feature_layers], dim=-1)
        if request.cls_hidden
        else None,
    )


# -- token meter ---------------------------------------------------------------------------------------------------


def rows_per_sequence(args: tuple, kwargs: dict) -> list[int]:
    """Attention segments of an encoder layer called on a [batch, tokens, d] batch: one per sequence."""
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return []
    return [int(x.shape[-2])] * (int(x.numel() // (x.shape[-1] * x.shape[-2])))


def packed_segments(args: tuple, kwargs: dict) -> list[int]:
    """Attention segments of a block on a packed sequence, from the ``cu_seqlens`` it was called with (Qwen-VL)."""
    cu = kwargs.get("cu_seqlens")
    if cu is None:
        return rows_per_sequence(args, kwargs)
    return [int(n) for n in torch.diff(cu.long()).tolist() if n]


@dataclass
class TokenMeter:
    """Counts what the vision side of one call really ran on: per encoder layer the length of every attention
    segment, the rows entering the projector, and the rows entering a pooling head.

    This is the token trace FLOPs are priced from (``tokensieve.tools.flops``); it counts rows, never FLOPs, so it costs
    nothing measurable. Forward hooks (registered before any selection hook of the call) see each module's final
    inputs, after other hooks rewrote them (Qwen-VL's cut ``cu_seqlens``, a projector input replaced by the kept
    tokens); a layer never reached (an encoder stopped after the features) records nothing.
    """

    layers: Sequence[nn.Module]
    projectors: Sequence[nn.Module] = ()
    head: nn.Module | None = None
    segments_of: object = rows_per_sequence

    def __post_init__(self) -> None:
        self.segments: list[list[int]] = [[] for _ in self.layers]
        self.projected = 0
        self.head_tokens: list[int] = []
        self._handles: list = []

    def __enter__(self) -> TokenMeter:
        def layer_hook(i):
            def hook(mod, args, kwargs, output):
                self.segments[i] += self.segments_of(args, kwargs)

            return hook

        def projector_hook(mod, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            self.projected += int(x.numel() // x.shape[-1])

        def head_hook(mod, args, kwargs, output):
            self.head_tokens += rows_per_sequence(args, kwargs)

        try:
            for i, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
            for mod in self.projectors:
                self._handles.append(mod.register_forward_hook(projector_hook, with_kwargs=True))
            if self.head is not None:
                self._handles.append(self.head.register_forward_hook(head_hook, with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def pooling_head(tower: nn.Module) -> nn.Module | None:
    """The attention-pooling head a SigLIP tower runs after its encoder (``vision_use_head``), if any."""
    inner = getattr(tower, "vision_model", tower)
    return getattr(inner, "head", None) if getattr(inner, "use_head", False) else None
