"""HiPrune: anchors from a middle "object" layer, their neighbours, and registers from the output layer.

Liu et al., HiPrune (Danielement321/HiPrune), LLaVA-1.5 path as summarised in the reference notes (section 8).
The statistic is the attention each patch *receives*, averaged over heads and over every query row of the layer
(not the CLS row), computed from that layer's q/k in query chunks; the encoder itself stays on SDPA.

* Anchors: the top ``max(1, round(k * alpha / 5))`` patches at the object layer (``alpha`` = 0.1).
* Buffers: the 4-neighbours (left, right, up, down) of every anchor. Unlike the reference code we do not wrap
  across row ends: a left/right neighbour must be on the same grid row (our reading of "neighbour").
* Registers: the remaining ``k - |anchors + buffers|`` slots go to the top patches by output-layer attention among
  those not yet chosen. If anchors and buffers alone exceed ``k`` (tiny budgets), anchors come first, then
  buffers by object-layer attention.

Layers: the object layer defaults to 0-based module 8 of a 24-layer CLIP (the paper's 1-indexed layer 9), scaled
by depth for other encoders (``round(9 / 24 * L) - 1``); the output layer is the one producing the features
(``feature_layer - 1``). Both are arguments. Kept patches are in raster order.
"""

from __future__ import annotations

import torch

from ..errors import BudgetError, MissingSignalError
from . import register
from .base import PRE_PROJECTOR, Method, Request, Selection, Signals, topk_sorted


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
        "output_layer": "encoder layer whose received attention picks registers; None: the layer producing the features",
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
        if not 1 <= k <= n:
            raise BudgetError(f"k must be in [1, {n}], got {k}")
        obj, out = self._layers(signals.num_layers, signals.feature_layer)
        for layer in (obj, out):
            if layer not in signals.attention_received:
                raise MissingSignalError(f"hiprune needs the attention received at encoder layer {layer}")
        if signals.layout.num_prefix:
            raise MissingSignalError("hiprune works on patch candidates only (use the 'default' feature strategy)")
        rows, cols = signals.layout.grid
        obj_att = signals.attention_received[obj].float()
        out_att = signals.attention_received[out].float()
        n_anchor = min(k, max(1, round(k * self.alpha / 5)))
        anchors = topk_sorted(obj_att, n_anchor)  # [B, a]
        r, c = anchors // cols, anchors % cols
        neigh = torch.stack([anchors - 1, anchors + 1, anchors - cols, anchors + cols], dim=-1)
        valid = torch.stack([c > 0, c < cols - 1, r > 0, r < rows - 1], dim=-1)
        b = obj_att.shape[0]
        chosen_buf = torch.zeros(b, n, dtype=torch.bool, device=obj_att.device)
        chosen_buf.scatter_(1, torch.where(valid, neigh, anchors.unsqueeze(-1)).flatten(1), True)
        is_anchor = torch.zeros_like(chosen_buf).scatter_(1, anchors, True)
        # one ordering does every case: anchors, then buffers (by object attention), then registers (output)
        rank = torch.where(is_anchor, 4.0, torch.where(chosen_buf, 2.0 + obj_att / obj_att.amax(-1, keepdim=True)
                                                       .clamp_min(1e-12) * 0.5, out_att / out_att.amax(
                                                           -1, keepdim=True).clamp_min(1e-12)))
        return Selection(indices=topk_sorted(rank, k), scores=rank)
