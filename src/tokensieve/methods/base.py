"""The contract between a selection method and the rest of tokensieve.

A method is a pure function of tensors: it states which encoder signals it needs (:class:`Request`), receives them
already aligned with the candidate tokens (:class:`Signals`), and returns which tokens survive (:class:`Selection`).
It never sees a model, so the same file works on every model family an adapter can feed, and it can be tested on
hand-made tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import BudgetError

if TYPE_CHECKING:
    from .llm import LLMMethod

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
    attention_received: tuple[int, ...] = ()
    """Encoder layers whose full attention map is reduced to the attention each token receives (HiPrune)."""


@dataclass
class Signals:
    """Everything a method may read, aligned with the N candidate tokens of each image.

    features:      [B, N, d] the candidates themselves (vision features or projected tokens, per the stage).
    hidden_states: {hidden_states index: [B, N, d_v]} patch rows only, in candidate order.
    cls_attention: {layer: [B, H, N]} softmax attention of the CLS query, restricted to the candidate keys
                   (rows are not renormalised: they are the probabilities the encoder actually used).
    keys:          {layer: [B, H, N, head_dim]} attention keys of the candidates.
    cls_hidden:    [B, d_v] CLS hidden state at the feature layer, when the encoder has one.
    attention_received: {layer: [B, N]} attention each candidate receives, averaged over heads and over every
                   query row of the layer (CLS included), from that layer's q/k.
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
    attention_received: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]

    def row(self, i: int) -> Signals:
        """Candidate set ``i`` alone, as a batch of one (views, no copies)."""
        one = slice(i, i + 1)
        return Signals(
            features=self.features[one],
            layout=self.layout,
            num_layers=self.num_layers,
            feature_layer=self.feature_layer,
            hidden_states={k: v[one] for k, v in self.hidden_states.items()},
            cls_attention={k: v[one] for k, v in self.cls_attention.items()},
            keys={k: v[one] for k, v in self.keys.items()},
            cls_hidden=None if self.cls_hidden is None else self.cls_hidden[one],
            attention_received={k: v[one] for k, v in self.attention_received.items()},
        )


@dataclass
class Selection:
    """Result of a method for a batch of images.

    indices: [B, k] candidate indices the method keeps, ascending (raster order).
    tokens:  [B, k_out, d] output tokens when the method creates tokens (merging, pooling); ``None`` means the
             output is the plain gather of ``indices``. ``num_merged`` of the output tokens are such created tokens.
    scores:  [B, N] optional per-candidate scores, for reports and plots.
    groups:  [B, N] optional, for methods that merge: the output token each candidate went into (-1: dropped), so
             reports and ``tokensieve show`` can draw merge groups.
    anchors: [B, k_out] optional, for ``tokens`` that are not one per index: the candidate each output token
             stands at (a merged token's destination; -1 for a token with no grid position, such as a CLS
             hidden state), so families that place tokens by position can place it.
    """

    indices: torch.Tensor
    tokens: torch.Tensor | None = None
    num_merged: int = 0
    scores: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    anchors: torch.Tensor | None = None

    def output(self, features: torch.Tensor) -> torch.Tensor:
        if self.tokens is not None:
            return self.tokens
        return gather_tokens(features, self.indices)

    @property
    def num_out(self) -> int:
        return self.tokens.shape[1] if self.tokens is not None else self.indices.shape[1]

    def row(self, i: int) -> Selection:
        """The selection of candidate set ``i`` alone, as a batch of one."""
        one = slice(i, i + 1)
        pick = lambda t: None if t is None else t[one]  # noqa: E731
        return Selection(
            indices=self.indices[one],
            tokens=pick(self.tokens),
            num_merged=self.num_merged,
            scores=pick(self.scores),
            groups=pick(self.groups),
            anchors=pick(self.anchors),
        )


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
    any_count: ClassVar[bool] = True
    """The method can keep any k in [1, N]; adaptive budgets (a count per image) need that."""
    param_help: ClassVar[dict[str, str]] = {}
    """One line per constructor argument: what it changes (``tokensieve methods NAME`` prints it beside the default;
    a test requires every argument to have one)."""

    def request(self, num_layers: int, feature_layer: int) -> Request:
        """Signals needed, given the encoder depth and the hidden_states index the LM consumes."""
        return Request()

    def check_depth(self, num_layers: int, feature_layer: int) -> None:
        """Raise ``ValueError`` (naming the parameter, its value and the valid range) when a layer this method's
        parameters name does not exist on an encoder of ``num_layers`` layers whose features are
        ``hidden_states[feature_layer]``. Called at ``apply()`` with the model's real depth, so a bad layer fails
        before any call; by default, asking for the signals is the check."""
        self.request(num_layers, feature_layer)

    def select(self, signals: Signals, k: int) -> Selection:
        raise NotImplementedError

    companion_switch: ClassVar[str | None] = None
    """The boolean parameter that turns :meth:`llm_companion` off (ToDRE: ``relevance``), for refusals to name."""

    def llm_companion(self) -> LLMMethod | None:
        """The in-LLM part of a two-stage method (ToDRE), run after this one in the same call; ``None`` for most."""
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x[b, indices[b]]`` for every b: [B, N, d] x [B, k] -> [B, k, d]."""
    return torch.gather(x, 1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def read_lists(tensors: Sequence[torch.Tensor]) -> list[list]:
    """Each tensor's values as a flat Python list, in one device-to-host transfer for all of them.

    The one way a method (or the engine) reads device values on the host: a rule that needs host values reads
    them for the whole batch at once, since every read stalls a GPU until its queue drains."""
    if not tensors:
        return []
    flat = [t.reshape(-1) for t in tensors]
    dtype = torch.float64 if any(t.is_floating_point() for t in flat) else torch.long
    device = flat[0].device
    values = torch.cat([t.to(device=device, dtype=dtype) for t in flat]).tolist()
    out, start = [], 0
    for t in flat:
        n = t.numel()
        chunk = values[start : start + n]
        out.append(chunk if dtype == torch.long or t.is_floating_point() else [int(v) for v in chunk])
        start += n
    return out


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, returned in ascending (raster) order.

    Exact ties go to the lower index (a stable sort keeps equal scores in index order), so results do not depend
    on the top-k kernel; distinct scores, however close, are never reordered.
    """
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k]
    return order.sort(dim=-1).values


def check_k(k: int, n: int) -> None:
    """The one check every selector makes: keep at least one of the ``n`` candidates and at most all of them.

    Budgets are resolved to ``k`` before a method runs (``Budget.resolve``), so a ``k`` outside ``[1, n]`` here is a
    caller's bug or a hand-made call, refused the same way for every method."""
    if not 1 <= k <= n:
        raise BudgetError(f"k must be in [1, {n}], got {k}")


class ScoreMethod(Method):
    """A selector that ranks candidates by one score per token and keeps the ``k`` best, in raster order.

    Subclasses implement :meth:`scores`; the k check, the tie rule (:func:`topk_sorted`) and the scores in the
    :class:`Selection` (which adaptive budgets' ``criterion="scores"`` reads) are the same for all of them."""

    def scores(self, signals: Signals) -> torch.Tensor:
        """[B, N] scores of the candidates, higher is kept first."""
        raise NotImplementedError

    def select(self, signals: Signals, k: int) -> Selection:
        check_k(k, signals.num_tokens)
        scores = self.scores(signals)
        return Selection(indices=topk_sorted(scores, k), scores=scores)


_MOVED = {
    **dict.fromkeys(
        ("EncoderPlan", "EncoderState", "EncoderCut", "EncoderMethod", "keep_with_cls", "check_plan_layers"),
        "encoder",
    ),
    **dict.fromkeys(
        ("QUERY_LAST", "QUERY_TEXT", "LLMSignals", "LLMMethod", "averaged_tokens", "per_segment_topk"), "llm"
    ),
}


def __getattr__(name: str):
    """``tokensieve.methods.base`` once held the in-encoder and in-LLM contracts too; their old import path works."""
    if name in _MOVED:
        from importlib import import_module

        return getattr(import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
