"""The contract of in-LLM methods: selectors that drop visual tokens between decoder layers of the language model.

A method plans a schedule of boundaries from a layer-averaged budget (:meth:`LLMMethod.schedule`) and keeps indices
at each boundary from :class:`LLMSignals`; the engine's in-LLM stage (``tokensieve.engine.llm_stage``) gathers the
sequence there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import IN_LLM, Method, topk_sorted

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
                 received it, counting real tokens only (padding excluded): host ints (a list) where the stage
                 knows them without reading the device, else a tensor. ``None``: visual tokens are taken as
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

    def select_llm_batch(self, signals: list[LLMSignals], ks: list[list[int | None]]) -> list[list[torch.Tensor]]:
        """:meth:`select_llm` for every sample of a batch at one boundary. Methods whose rule needs values on the
        host (a pivot's position, a yes/no decision) override this to read them for the whole batch at once: a
        read per sample would stall a GPU once per sample."""
        return [self.select_llm(sig, k) for sig, k in zip(signals, ks)]

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
