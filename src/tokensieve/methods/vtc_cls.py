"""VTC-CLS: FasterVLM's CLS-attention score, summed over many encoder layers.

Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs". Follows
``cls_token_only`` (``llava/model/multimodal_encoder/clip_encoder.py``) and ``encode_images`` of the official code
(THU-MIG/VTC-CLS @ e41ac9b4): the head-mean CLS attention to each patch, summed over encoder layers
``start_layer .. end_layer``, top-k in raster order. On the same inputs it keeps the same patches.

The official code sums layers ``start .. L - 2`` (every attention map but the last), i.e. up to the layer that
produces LLaVA's ``hidden_states[-2]``; ``end_layer`` defaults to that layer, ``feature_layer - 1``, for any
feature layer. Each row is computed from that layer's q/k only (the CLS query row), so the encoder stays on SDPA.

Deliberate difference: ``start_layer`` is a required command-line argument of the official scripts (the paper
sweeps it); here it defaults to ``L // 2`` (or the end layer, when the features come from an earlier layer).
Exact ties go to the lower index.
"""

from __future__ import annotations

import torch

from ..errors import MissingSignalError
from .base import PRE_PROJECTOR, Request, ScoreMethod, Signals
from .registry import register


@register
class VtcCls(ScoreMethod):
    name = "vtc_cls"
    description = "Keep the top-k patches by [CLS] attention (head mean) summed over a range of encoder layers."
    stage = PRE_PROJECTOR
    signals = ("CLS attention (layer range)",)
    param_help = {
        "start_layer": "first encoder layer (0-based) whose CLS attention is summed; None: half the depth",
        "end_layer": "last layer summed; None: the feature layer, clamped to the last layer",
    }

    def __init__(self, start_layer: int | None = None, end_layer: int | None = None):
        for name, v in (("start_layer", start_layer), ("end_layer", end_layer)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {v!r}")
        self.start_layer, self.end_layer = start_layer, end_layer

    def _layers(self, num_layers: int, feature_layer: int) -> tuple[int, ...]:
        end = feature_layer - 1 if self.end_layer is None else self.end_layer
        start = min(num_layers // 2, end) if self.start_layer is None else self.start_layer
        if not 0 <= start <= end < num_layers:
            given = lambda v: "" if v is not None else " (default)"  # noqa: E731
            raise ValueError(
                f"vtc_cls needs 0 <= start_layer <= end_layer <= {num_layers - 1} (the encoder's layers), got "
                f"start_layer={start}{given(self.start_layer)}, end_layer={end}{given(self.end_layer)}"
            )
        return tuple(range(start, end + 1))

    def request(self, num_layers: int, feature_layer: int) -> Request:
        return Request(cls_attention=self._layers(num_layers, feature_layer))

    def scores(self, signals: Signals) -> torch.Tensor:
        layers = self._layers(signals.num_layers, signals.feature_layer)
        missing = [i for i in layers if i not in signals.cls_attention]
        if missing:
            raise MissingSignalError(f"vtc_cls needs the CLS attention of encoder layers {missing}")
        return sum(signals.cls_attention[i].float().mean(dim=1) for i in layers)
