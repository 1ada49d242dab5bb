"""FasterVLM: keep the patches the [CLS] query attends to most.

Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning" (FasterVLM), arXiv
2412.01818. Follows ``feature_select`` / ``encode_images`` of the official code (Theia-4869/FasterVLM @ f5d5f120,
``llava/model/multimodal_encoder/clip_encoder.py`` and ``llava/model/llava_arch.py``): the score is the head-mean of
the CLS attention row at the layer that *produces* the features the LM consumes (``feature_layer - 1``, i.e. CLIP
layer 22 for LLaVA's ``hidden_states[-2]``); ``layer`` overrides it. Kept tokens stay in raster order. On the same
inputs it keeps the same patches.

Deliberate differences from the official code: exact ties go to the lower index; on LLaVA-NeXT the official code
forces the ``spatial`` merge (no unpadding) and takes k per crop, while here the model's own merge is kept and the
budget's scope sets the per-crop counts (the family adapter's rules, the same for every method).
"""

from __future__ import annotations

import torch

from ..errors import MissingSignalError
from .base import PRE_PROJECTOR, Request, ScoreMethod, Signals
from .registry import register


@register
class FasterVLM(ScoreMethod):
    name = "fastervlm"
    description = "Keep the top-k patches by [CLS] attention (head mean) at the feature layer."
    stage = PRE_PROJECTOR
    signals = ("CLS attention (feature layer)",)
    param_help = {
        "layer": "encoder layer (0-based) whose CLS attention ranks patches; None: the layer producing the features",
    }

    def __init__(self, layer: int | None = None):
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
            raise ValueError(f"layer must be a non-negative int or None, got {layer!r}")
        self.layer = layer

    def _layer(self, num_layers: int, feature_layer: int) -> int:
        layer = self.layer if self.layer is not None else feature_layer - 1
        if not 0 <= layer < num_layers:
            raise ValueError(f"fastervlm layer={layer} must be in [0, {num_layers - 1}] for this encoder")
        return layer

    def request(self, num_layers: int, feature_layer: int) -> Request:
        return Request(cls_attention=(self._layer(num_layers, feature_layer),))

    def scores(self, signals: Signals) -> torch.Tensor:
        """[B, N] head-mean CLS attention of the scoring layer, after checking the signal's shape."""
        n = signals.num_tokens
        layer = self._layer(signals.num_layers, signals.feature_layer)
        if layer not in signals.cls_attention:
            raise MissingSignalError(f"{self.name} needs the CLS attention of encoder layer {layer}")
        attention = signals.cls_attention[layer].float()
        if tuple(attention.shape[::2]) != (signals.batch, n):
            raise ValueError(f"cls_attention[{layer}] has shape {tuple(attention.shape)}, expected [B, H, {n}]")
        return attention.mean(dim=1)
