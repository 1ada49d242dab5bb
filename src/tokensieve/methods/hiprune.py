"""HiPrune: anchors from a middle "object" layer, their neighbours, and registers from the output layer.

Liu et al., HiPrune (Danielement321/HiPrune @ 6e83a124); follows ``LLaVA/llava/model/llava_arch.py::encode_images``
(the Qwen2.5-VL file applies the same rule on merge units), and on the same inputs keeps the same patches, apart
from the differences listed at the end. The statistic is the attention each patch *receives*, averaged over heads
and over every query row of the layer (CLS included; not the CLS row), computed from that layer's q/k in query
chunks; the encoder itself stays on SDPA.

* Anchors: the top ``round(k * alpha / 5)`` patches at the object layer (``alpha`` = 0.1; Python rounding, half to
  even, so ``k <= 25`` gives no anchor and every slot goes to registers, as in the official code).
* Buffers: for every anchor ``a``, the patches ``a - 1``, ``a + 1``, ``a - W``, ``a + W`` (``W`` the grid width),
  by raster index as the official code takes them: a left or right neighbour at a row end is the last patch of
  the row above or the first of the row below (it wraps), and an index outside the grid is clamped to the first
  or last patch (an anchor in the top row brings patch 0, one in the bottom row the last patch). Anchors and
  buffers are one de-duplicated set.
* Registers: the remaining ``k - |anchors + buffers|`` slots go to the top patches by output-layer attention among
  those not yet chosen. Kept patches are in raster order.

Layers: the object layer defaults to 0-based module 8 of a 24-layer CLIP (the paper's and the official LLaVA
script's 1-indexed layer 9), scaled by depth for other encoders (``round(9 / 24 * L) - 1``); the output layer is
the one producing the features (``feature_layer - 1``, the official ``mm_vision_select_layer``). Both are
arguments.

Deliberate differences from the official code, and why:

* When anchors and buffers alone exceed ``k`` (only with ``alpha`` far above its default) the official code fails
  (a negative top-k); here anchors come first, then buffers by object-layer attention, so every budget works.
* Exact ties go to the lower index (the official ``torch.topk`` leaves their order to the kernel).
* The object layer of other encoders is scaled from CLIP-L's; the official Qwen2.5-VL script sets 16 of 32
  (1-indexed) by hand, where the scaling gives module 11: pass ``object_layer=15`` to match it there.
"""

from __future__ import annotations

import torch

from ..errors import MissingSignalError
from .base import PRE_PROJECTOR, Method, Request, Selection, Signals, check_k, topk_sorted
from .registry import register


def _layer_arg(name, v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise ValueError(f"{name} must be a non-negative int or None, got {v!r}")


@register
class HiPrune(Method):
    name = "hiprune"
    description = "Anchors (object-layer attention) + their 4-neighbours + registers (output-layer attention)."
    stage = PRE_PROJECTOR
    signals = ("attention received (object layer)", "attention received (output layer)")
    param_help = {
        "object_layer": "encoder layer (0-based) whose received attention picks anchors; None: 9/24 of the depth",
        "output_layer": (
            "encoder layer whose received attention picks registers; None: the layer producing the features"
        ),
        "alpha": "anchor share: max(1, round(k * alpha / 5)) anchors, in [0, 5]",
    }

    def __init__(self, object_layer: int | None = None, output_layer: int | None = None, alpha: float = 0.1):
        _layer_arg("object_layer", object_layer)
        _layer_arg("output_layer", output_layer)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 5:
            raise ValueError(f"alpha must be in [0, 5], got {alpha!r}")
        self.object_layer, self.output_layer, self.alpha = object_layer, output_layer, float(alpha)

    def _layers(self, num_layers: int, feature_layer: int) -> tuple[int, int]:
        obj = self.object_layer if self.object_layer is not None else max(0, round(9 / 24 * num_layers) - 1)
        out = self.output_layer if self.output_layer is not None else feature_layer - 1
        for name, v in (("object_layer", obj), ("output_layer", out)):
            if not 0 <= v < num_layers:
                raise ValueError(f"{name} must be in [0, {num_layers - 1}] for this encoder, got {v}")
        return obj, out

    def request(self, num_layers: int, feature_layer: int) -> Request:
        return Request(attention_received=tuple(sorted(set(self._layers(num_layers, feature_layer)))))

    def select(self, signals: Signals, k: int) -> Selection:
        n = signals.num_tokens
        check_k(k, n)
        obj, out = self._layers(signals.num_layers, signals.feature_layer)
        for layer in (obj, out):
            if layer not in signals.attention_received:
                raise MissingSignalError(f"hiprune needs the attention received at encoder layer {layer}")
        if signals.layout.num_prefix:
            raise MissingSignalError("hiprune works on patch candidates only (use the 'default' feature strategy)")
        cols = signals.layout.grid[1]
        obj_att = signals.attention_received[obj].float()
        out_att = signals.attention_received[out].float()
        n_anchor = min(k, round(k * self.alpha / 5))  # the official count: no floor of one
        anchors = topk_sorted(obj_att, n_anchor)  # [B, a]
        neigh = torch.stack([anchors - 1, anchors + 1, anchors - cols, anchors + cols], dim=-1).clamp(0, n - 1)
        chosen = torch.zeros(obj_att.shape, dtype=torch.bool, device=obj_att.device)
        chosen.scatter_(1, anchors, True).scatter_(1, neigh.flatten(1), True)
        # every row at once, no host reads: a row's register count k - |chosen| differs between images, so each
        # row keeps its top-``extra`` ranks (the ranking topk_sorted uses: stable, ties to the lower index)
        extra = k - chosen.sum(dim=1, keepdim=True)
        registers = (_ranks(out_att.masked_fill(chosen, float("-inf"))) < extra) & ~chosen
        # anchors and buffers overflow k (not reachable in the official code): anchors, then the best buffers
        is_anchor = torch.zeros_like(chosen).scatter_(1, anchors, True)
        buffers = _ranks(obj_att.masked_fill(~chosen | is_anchor, float("-inf"))) < k - n_anchor
        keep = torch.where(extra >= 0, chosen | registers, is_anchor | (buffers & chosen & ~is_anchor))
        where = torch.arange(n, device=keep.device).expand_as(keep).masked_fill(~keep, n)
        return Selection(indices=where.sort(dim=1).values[:, :k], scores=out_att)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] each candidate's place in its row's stable descending order (0 = best)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(
        -1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    )
