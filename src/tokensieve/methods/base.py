"""The contract between a selection method and the rest of tokensieve.

A method is a pure function of tensors: it states which encoder signals it needs (:class:`Request`), receives them
already aligned with the candidate tokens (:class:`Signals`), and returns which tokens survive (:class:`Selection`).
It never sees a model, so the same file works on every model family an adapter can feed, and it can be tested on
hand-made tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

PRE_PROJECTOR = "pre_projector"
"""Stage: select on vision-encoder features, before the projector maps them into the LM's space."""
POST_PROJECTOR = "post_projector"
"""Stage: select on projected tokens, i.e. the LM input embeddings of the image."""
IN_ENCODER = "in_encoder"
"""Stage: drop or merge tokens between vision-encoder layers, so later encoder layers run on fewer tokens."""
IN_LLM = "in_llm"
"""Stage: drop visual tokens between decoder layers of the language model, after it has read the prompt."""


@dataclass(frozen=True)
class Layout:
    """Where the candidate tokens sit in the image.

    ``grid`` is the (rows, cols) patch grid. ``num_prefix`` leading candidates are not grid patches (the CLS token
    when a model feeds it to the LM); candidate ``num_prefix + r * cols + c`` is patch (r, c).
    """

    grid: tuple[int, int]
    num_prefix: int = 0

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Request:
    """Encoder signals a method needs, named by encoder depth.

    ``hidden_states`` are indices into the usual ``hidden_states`` tuple (0 = embeddings, i = output of layer i-1).
    ``cls_attention`` and ``keys`` name encoder *layer* indices (0-based modules). The adapter captures exactly
    these with removable hooks, so a method that asks for nothing costs nothing.
    """

    hidden_states: tuple[int, ...] = ()
    cls_attention: tuple[int, ...] = ()
    keys: tuple[int, ...] = ()
    cls_hidden: bool = False


@dataclass
class Signals:
    """Everything a method may read, aligned with the N candidate tokens of each image.

    features:      [B, N, d] the candidates themselves (vision features or projected tokens, per the stage).
    hidden_states: {hidden_states index: [B, N, d_v]} patch rows only, in candidate order.
    cls_attention: {layer: [B, H, N]} softmax attention of the CLS query, restricted to the candidate keys
                   (rows are not renormalised: they are the probabilities the encoder actually used).
    keys:          {layer: [B, H, N, head_dim]} attention keys of the candidates.
    cls_hidden:    [B, d_v] CLS hidden state at the feature layer, when the encoder has one.
    num_layers:    encoder depth; feature_layer: hidden_states index of ``features`` (non-negative).
    """

    features: torch.Tensor
    layout: Layout
    num_layers: int
    feature_layer: int
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)
    cls_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    cls_hidden: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]


@dataclass
class Selection:
    """Result of a method for a batch of images.

    indices: [B, k] candidate indices the method keeps, ascending (raster order).
    tokens:  [B, k_out, d] output tokens when the method creates tokens (merging, pooling); ``None`` means the
             output is the plain gather of ``indices``. ``num_merged`` of the output tokens are such created tokens.
    scores:  [B, N] optional per-candidate scores, for reports and plots.
    anchors: [B, k_out] optional, for ``tokens`` that are not one per index: the candidate each output token
             stands at (a merged token's destination; -1 for a token with no grid position, such as a CLS
             hidden state), so families that place tokens by position can place it.
    """

    indices: torch.Tensor
    tokens: torch.Tensor | None = None
    num_merged: int = 0
    scores: torch.Tensor | None = None
    anchors: torch.Tensor | None = None

    def output(self, features: torch.Tensor) -> torch.Tensor:
        if self.tokens is not None:
            return self.tokens
        return gather_tokens(features, self.indices)

    @property
    def num_out(self) -> int:
        return self.tokens.shape[1] if self.tokens is not None else self.indices.shape[1]


class Method:
    """Base class of every selector. Subclasses set the class attributes and implement :meth:`select`.

    Constructor keyword arguments are the method's hyper-parameters; validate them in ``__init__`` so a bad value
    fails before a model is touched.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    stage: ClassVar[str] = PRE_PROJECTOR
    signals: ClassVar[tuple[str, ...]] = ()
    """Human-readable names of the signals used, for ``list_methods()``."""

    def request(self, num_layers: int, feature_layer: int) -> Request:
        """Signals needed, given the encoder depth and the hidden_states index the LM consumes."""
        return Request()

    def select(self, signals: Signals, k: int) -> Selection:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x[b, indices[b]]`` for every b: [B, N, d] x [B, k] -> [B, k, d]."""
    return torch.gather(x, 1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, returned in ascending (raster) order.

    Ties are broken towards the lower index so that results do not depend on the top-k kernel.
    """
    n = scores.shape[-1]
    # a tiny, strictly decreasing offset makes the order total without changing any strict comparison
    tie = torch.arange(n, device=scores.device, dtype=torch.float64) * (-1e-12)
    order = torch.argsort(scores.double() + tie, dim=-1, descending=True, stable=True)[..., :k]
    return order.sort(dim=-1).values
