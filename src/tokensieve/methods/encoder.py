"""The contract of in-encoder methods: selectors that shrink the sequence between vision-encoder layers.

They stay pure selectors: :meth:`EncoderMethod.plan` names the layers and signals before the encoder runs,
:meth:`EncoderMethod.cut` maps the sequence after one layer (:class:`EncoderState`) to the rows that survive
(:class:`EncoderCut`). The engine's encoder stage (``tokensieve.engine.encoder_stage``) applies the cuts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import BudgetError
from .base import IN_ENCODER, Layout, Method, Selection, Signals


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


def check_patch_target(name: str, k: int, num_prefix: int) -> int:
    """Patches an in-encoder cut must end with for a budget of ``k`` candidates: CLS stays inside the encoder, and is
    a candidate only when the host feeds it to the LM (``num_prefix``), so at least one patch must remain."""
    target = k - num_prefix
    if target < 1:
        raise BudgetError(f"{name} keeps CLS and at least one patch; a budget of {k} leaves no patch")
    return target


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
