"""FlowCut: progressive pruning inside the vision encoder, following the information flow to CLS.

Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models", NeurIPS
2025 (arXiv 2505.19536), LLaVA-1.5 path of the official code as summarised in the reference notes (section 3).

Per encoder layer ``l`` before the feature layer, from that layer's own q/k/v (no eager attention anywhere):

* ``I_a``: head-mean CLS attention to each patch; ``I_s``: per head, softmax over tokens of the raw dot product of
  the CLS value with every value, head-averaged; ``I_d``: L1 norm of the head-mean value.
* ``S = (I_a / sum I_a + I_s / sum I_s) * I_d``, accumulated as ``S_cum = 0.5 S_cum + 0.5 S`` (the first layer
  initialises) while more patches than the target remain.
* With ``rpl = feature_layer - l - 1`` layers left, a cut happens when ``rpl`` is even: ``P = round((N - T) /
  sqrt(rpl) * (1 - r_H^2))`` patches go, where ``r_H`` is the entropy of the CLS attention over the patches
  (renormalised) divided by ``log N``; at ``rpl = 0`` (the layer producing the feature layer) the count is forced
  to ``T``. Concentrated attention (low entropy) prunes harder.
* Survivors are the top ``S_cum``, in raster order; ``S_cum`` follows them; pruned patches are dropped.

Reading choices: ``I_s`` softmaxes over all tokens (CLS included) and keeps the patch entries, like ``I_a``, whose
row also includes the CLS key. Because the count at a cut depends on the image, a batch runs one image at a time
(identical to calling it on each image alone); the last cut still gives every image exactly ``T`` patches.
"""

from __future__ import annotations

import math

import torch

from . import register
from .base import EncoderCut, EncoderMethod, EncoderPlan, EncoderState, check_plan_layers, keep_with_cls, topk_sorted


def flowcut_scores(cls_attention: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-layer scores [B, N] over patches, from CLS rows [B, H, 1+N] and values [B, H, 1+N, hd]."""
    v = values.float()
    att = cls_attention[:, :, 1:].float().mean(dim=1)
    rel = (v[:, :, :1] @ v.transpose(-1, -2)).squeeze(-2).softmax(dim=-1)[:, :, 1:].mean(dim=1)
    density = v[:, :, 1:].mean(dim=1).abs().sum(dim=-1)
    norm = lambda x: x / x.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    return (norm(att) + norm(rel)) * density


def normalised_entropy(cls_attention: torch.Tensor) -> torch.Tensor:
    """Entropy of the head-mean CLS attention over patches, renormalised, divided by log N: [B] in [0, 1]."""
    p = cls_attention[:, :, 1:].float().mean(dim=1)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    n = p.shape[-1]
    h = -(p * p.clamp_min(1e-30).log()).sum(dim=-1)
    return h / math.log(n) if n > 1 else torch.zeros_like(h)


@register
class FlowCut(EncoderMethod):
    name = "flowcut"
    description = "Prune patches every second encoder layer by CLS attention + value relevance x value density (EMA)."
    signals = ("CLS attention (every layer)", "values (every layer)")
    param_help = {
        "ema": "weight of the running score against the new layer's score, in [0, 1)",
        "skip_unused_layers": "stop the encoder after the layer the LM reads (no output changes; saves compute)",
    }

    def __init__(self, ema: float = 0.5, skip_unused_layers: bool = True):
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        self.ema = float(ema)
        self.skip_unused_layers = bool(skip_unused_layers)

    def plan(self, num_layers: int, feature_layer: int) -> EncoderPlan:
        layers = check_plan_layers(range(0, feature_layer), num_layers, feature_layer, self.name)
        return EncoderPlan(layers, cls_attention=True, values=True, per_image=True)

    def cut(self, state: EncoderState) -> EncoderCut | None:
        scores = flowcut_scores(state.cls_attention, state.values)
        mem = state.memory
        cum = scores if "score" not in mem else self.ema * mem["score"] + (1 - self.ema) * scores
        rpl = state.feature_layer - state.layer - 1
        n, target = state.num_patches, state.target
        if rpl % 2:
            mem["score"] = cum
            return None
        if rpl == 0:
            count = target
        else:
            r = normalised_entropy(state.cls_attention)
            if r.numel() != 1:
                raise ValueError("flowcut chooses a count per image; the encoder stage must run it one image at a time")
            drop = round((n - target) / math.sqrt(rpl) * (1 - float(r) ** 2))
            count = max(n - drop, target)
        kept = topk_sorted(cum, count)
        mem["score"] = torch.gather(cum, 1, kept)
        return EncoderCut(keep_with_cls(kept))
