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

    def llm_companion(self) -> LLMMethod | None:
        """The in-LLM part of a two-stage method (ToDRE), run after this one in the same call; ``None`` for most."""
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x[b, indices[b]]`` for every b: [B, N, d] x [B, k] -> [B, k, d]."""
    return torch.gather(x, 1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, returned in ascending (raster) order.

    Exact ties go to the lower index (a stable sort keeps equal scores in index order), so results do not depend
    on the top-k kernel; distinct scores, however close, are never reordered.
    """
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k]
    return order.sort(dim=-1).values


# -- in-encoder stage ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderPlan:
    """Where an in-encoder method acts, decided from the encoder depth before the forward starts.

    ``layers``: 0-based encoder layers after which the method is consulted (it may decline to cut at some of them,
    e.g. to update a running score). ``cls_attention`` / ``keys`` / ``values``: which signals it reads at those
    layers; the stage computes only these, from that layer's own projections.
    ``per_image``: the kept count may depend on the image (entropy-adaptive schedules), so a batch is run one image
    at a time; fixed-schedule methods run batched.
    """

    layers: tuple[int, ...]
    cls_attention: bool = False
    keys: bool = False
    values: bool = False
    per_image: bool = False


@dataclass
class EncoderState:
    """The sequence right after encoder layer ``layer``, as an in-encoder method sees it.

    hidden:        [B, T, d] output of ``layer`` (CLS at row 0).
    cls_attention: [B, H, T] softmax attention of the CLS query over all T keys at ``layer`` (CLS column included).
    keys, values:  [B, H, T, head_dim] of ``layer``.
    sizes:         [B, T] how many original tokens each row stands for (1 until merging; CLS is 1).
    positions:     [B, T] original patch index of each row (CLS: -1); a merged row keeps its destination's.
    target:        patch rows (CLS excluded) the sequence must have when the last planned layer is done.
    memory:        scratch that persists across the layers of one forward (running scores); fresh per forward.
    """

    layer: int
    num_layers: int
    feature_layer: int
    layout: Layout
    hidden: torch.Tensor
    sizes: torch.Tensor
    positions: torch.Tensor
    target: int
    cls_attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    memory: dict = field(default_factory=dict)

    @property
    def num_patches(self) -> int:
        return self.hidden.shape[1] - 1


@dataclass
class EncoderCut:
    """What survives one cut: ``keep`` [B, k] row indices into the current sequence, ascending, row 0 (CLS) first.

    ``hidden`` [B, k, d] replaces the gathered rows when the method merged dropped rows into kept ones; ``sizes``
    [B, k] are the merged sizes then (they must still sum to the original token count). ``groups`` [B, T-1] says,
    for a merge, which kept patch (0..k-2, in ``keep[:, 1:]`` order) each current patch row went into: families
    whose tokens are groups of encoder rows (Qwen's 2x2 merge units) replay the merge on the rows with it.
    """

    keep: torch.Tensor
    hidden: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    groups: torch.Tensor | None = None


class EncoderMethod(Method):
    """A method that shrinks the sequence between encoder layers (stage ``in_encoder``).

    It stays a pure selector: :meth:`plan` names layers and signals, :meth:`cut` maps one :class:`EncoderState` to
    an :class:`EncoderCut` (or ``None`` for no cut at this layer). The adapter's encoder stage applies cuts, keeps
    CLS, positions and sizes consistent, and makes the last planned cut land exactly on the target.
    """

    stage = IN_ENCODER

    def plan(self, num_layers: int, feature_layer: int) -> EncoderPlan:
        raise NotImplementedError

    def check_depth(self, num_layers: int, feature_layer: int) -> None:
        self.plan(num_layers, feature_layer)

    def cut(self, state: EncoderState) -> EncoderCut | None:
        raise NotImplementedError

    def select(self, signals: Signals, k: int) -> Selection:
        raise TypeError(f"{self.name} acts inside the vision encoder; it has no post-encoder select()")


def keep_with_cls(patch_keep: torch.Tensor) -> torch.Tensor:
    """Patch indices [B, k] (0-based over patch rows, ascending) -> row indices [B, 1 + k] with CLS at 0."""
    return torch.cat([torch.zeros_like(patch_keep[:, :1]), patch_keep + 1], dim=1)


def check_plan_layers(layers, num_layers: int, feature_layer: int, what: str) -> tuple[int, ...]:
    """Planned layers must exist and end before the feature layer (their output must reach the LM's features)."""
    layers = tuple(sorted(set(int(x) for x in layers)))
    if not layers:
        raise ValueError(f"{what}: the schedule has no layer for an encoder of {num_layers} layers")
    if layers[0] < 0 or layers[-1] > feature_layer - 1:
        raise ValueError(
            f"{what}: layers {list(layers)} must lie in [0, {feature_layer - 1}] (the feature layer is "
            f"hidden_states[{feature_layer}], the output of layer {feature_layer - 1})"
        )
    return layers


# -- in-LLM methods ----------------------------------------------------------------------------------------------

QUERY_LAST = "last"
"""Attention rows wanted: the last real token of the prompt (FastV's and PyramidDrop's scoring query)."""
QUERY_TEXT = "text"
"""Attention rows wanted: every text token after the first visual token (ToDRE's text-to-visual share)."""


@dataclass
class LLMSignals:
    """One sample at an in-LLM stage boundary, restricted to the visual tokens still in the sequence.

    hidden:      [n, d] hidden states of the visual tokens entering the stage layer, in sequence order.
    segments:    visual tokens per image, in order (they sum to n); budgets apply per image.
    attention:   [H, r, n] softmax attention of the requested query rows to the visual keys, from the layer named by
                 ``attention_from`` (not renormalised: ``attention.sum(-1)`` is each row's mass on visual keys).
    keys:        [n, H_kv * head_dim] post-RoPE keys of the visual tokens at the layer before the stage.
    text_keys / text_hidden: the same for the sample's real non-visual tokens (DART's text pivots).
    positions / text_positions: [n] / [m] where the visual / text tokens sit in the sample's sequence as the LM
                 received it, counting real tokens only (padding excluded). ``None``: visual tokens are taken as
                 consecutive from 0 and text tokens as following them.
    layer:       the decoder layer that will be the first to run without the dropped tokens; num_layers: LM depth.

    With ``LLMMethod.final_norm`` set, ``hidden`` and ``text_hidden`` have been through the LM's final norm.
    """

    hidden: torch.Tensor
    segments: list[int]
    layer: int
    num_layers: int
    attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text_keys: torch.Tensor | None = None
    text_hidden: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    text_positions: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    def split(self, x: torch.Tensor, dim: int = -1) -> list[torch.Tensor]:
        """Cut a per-visual-token tensor into its images."""
        return list(torch.split(x, self.segments, dim=dim))


class LLMMethod(Method):
    """A selector that runs between decoder layers: it plans a schedule, then keeps indices at each boundary.

    ``schedule`` turns one image's budget into boundaries; the in-LLM stage asks for the signals the class attributes
    name, computing attention rows from q/k of the named layer (the model stays on SDPA).
    """

    stage: ClassVar[str] = IN_LLM
    query: ClassVar[str | None] = None
    """``QUERY_LAST``, ``QUERY_TEXT`` or ``None`` (attention-free)."""
    attention_from: ClassVar[str] = "previous"
    """``previous``: attention of the layer before the boundary (FastV). ``current``: the boundary layer's own q/k on
    the hidden states entering it (PyramidDrop)."""
    needs_keys: ClassVar[bool] = False
    final_norm: ClassVar[bool] = False
    """True: the hidden states in :class:`LLMSignals` pass through the LM's final norm first (DART compares them so)."""
    budgeted: ClassVar[bool] = True
    """False for rules that decide counts themselves (ToDRE's relevance check); such stages take no budget."""

    def schedule(self, n: int, num_layers: int, target: int | None) -> list[tuple[int, int]]:
        """Boundaries for one image of ``n`` visual tokens: ``[(layer, tokens kept from that layer on), ...]``.

        ``target`` is the wanted average number of this image's visual tokens over all decoder layers (``None`` for
        unbudgeted rules). Raise :class:`BudgetError` when no schedule of this method can reach it.
        """
        raise NotImplementedError

    def select_llm(self, signals: LLMSignals, ks: list[int | None]) -> list[torch.Tensor]:
        """Per image, ascending indices into that image's current visual tokens to keep (``ks[i]`` of them)."""
        raise NotImplementedError

    def check_depth(self, num_layers: int, feature_layer: int | None = None) -> None:
        """In-LLM methods name decoder layers: ``num_layers`` is the LM's depth. A schedule that keeps everything
        must exist at any budget; when it does not, a layer parameter does not fit this LM."""
        for layer, _ in self.schedule(1, num_layers, 1 if self.budgeted else None):
            if not 1 <= layer < num_layers:
                raise ValueError(
                    f"{self.name} plans a boundary at decoder layer {layer}; it must lie in "
                    f"1..{num_layers - 1} for a {num_layers}-layer LM"
                )


def averaged_tokens(n: int, num_layers: int, plan: list[tuple[int, int]]) -> float:
    """Average visual tokens per decoder layer under ``plan`` (boundaries sorted by layer)."""
    total, count, prev = 0, n, 0
    for layer, kept in plan:
        total += count * (layer - prev)
        prev, count = layer, kept
    total += count * (num_layers - prev)
    return total / num_layers


def per_segment_topk(scores: torch.Tensor, segments: list[int], ks: list[int]) -> list[torch.Tensor]:
    """Top-``ks[i]`` of each image's scores, ascending (raster order), ties towards the lower index."""
    return [topk_sorted(s, k) for s, k in zip(torch.split(scores, segments), ks)]
