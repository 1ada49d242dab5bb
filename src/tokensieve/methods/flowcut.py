"""FlowCut: progressive pruning inside the vision encoder, following the information flow to CLS.

Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models", NeurIPS
2025 (arXiv 2505.19536). Follows the LLaVA-1.5 path of the official code (TungChintao/FlowCut @ a2ecd247,
``flowcut/modeling_clip_flowcut.py`` and ``flowcut/utils_flowcut.py``); on the same inputs it keeps the same
patches, apart from the differences listed at the end.

Per encoder layer ``l``, after the layer ran, from that layer's own q/k/v (no eager attention anywhere):

* ``I_a``: head-mean CLS attention to each patch; ``I_s``: per head, softmax over all tokens (CLS included) of the
  raw dot product of the CLS value with every value, head-averaged, patch entries; ``I_d``: L1 norm of the
  head-mean value.
* ``S = (I_a / sum I_a + I_s / sum I_s) * I_d`` (plain sums over the current patches), accumulated as
  ``S_cum = 0.5 S_cum + 0.5 S`` (the first layer initialises) while more patches than the target ``T`` remain.
* Schedule: ``rpl = F - 2 - l`` where ``F`` is the hidden_states index of the features (23 for CLIP-L read at
  ``-2``). The official code counts the remaining layers from the index of the layer that *produces* the features
  (its ``select_layer``, hard-coded to ``L - 2``: LLaVA's ``-2``; here it follows the configured feature layer),
  so the last cut comes one layer before it: a cut happens when ``rpl`` is even,
  i.e. after layers 1, 3, ..., 21 of CLIP-L, and layer 22, which produces the features, already runs on ``T``
  patches. At a cut ``P = round((N - T) / sqrt(rpl) * (1 - r_H^2))`` patches go, where ``r_H`` is the entropy of
  the CLS attention over the patches (renormalised by its plain sum) divided by ``log N``; at ``rpl = 0`` the count
  is forced to ``T``. Concentrated attention (low entropy) prunes harder. Layers ``0 .. F - 2`` are planned (the
  odd-``rpl`` ones only move ``S_cum``).
* Survivors are the top ``S_cum``, in raster order; ``S_cum`` follows them; pruned patches are dropped. CLS is
  always kept (the official code's budget + 1).

Other families run the same schedule with their own feature layer (OneVision's SigLIP and Idefics3 read the last
layer, Qwen's merger the last block: the last cut is then after layer ``L - 2``).

Deliberate differences from the official code, and why:

* A batch runs one image at a time, each with its own count at every cut. The official code takes the largest
  count over the batch, so an image's result would depend on its batch mates; its evaluation runs one image at a
  time, which is what this reproduces (``cut`` itself, handed several rows, takes their largest count too).
* A normalising sum that is exactly zero (no attention or relevance mass on any patch, e.g. after underflow in
  half precision) makes that term contribute nothing, and zero attention entries count ``0 log 0 = 0`` in the
  entropy (an all-zero row counts as uniform: no intermediate cut). The official arithmetic gives NaN there (NaN
  rankings, or a crash converting the count).
* LLaVA-NeXT: the official code feeds an image's crops to CLIP as one batch (one shared count per cut), prunes
  each to half the budget and then selects again at LLM layer 1. Here each crop is cut to its share of the budget
  by its own count and nothing happens in the LM (chain an in-LLM method for that): a budget is the number of
  tokens entering the LM, and crops may have different shares after unpadding.
* Qwen2-VL / Qwen2.5-VL: the official port (``FlowCut_Qwen``) scores with a mean query and no value-relevance
  term, prunes single patches (the merger then joins patches from different 2x2 blocks), does not update
  ``cu_seqlens`` or Qwen2.5-VL's windows, counts the remaining blocks from the last one (its last cut comes after
  it), keeps four times the target and finishes at LLM layer 1. Here the
  algorithm above runs on whole merge units (unit means, a virtual CLS from the mean query), with the schedule
  above, so the merger still sees whole blocks and several images or frames stay apart.
* Scores are computed in float32 whatever the model dtype (the official scripts run in float16).

Host reads: the count a cut keeps is entropy-adaptive per image (read off the attention, as the official code
does with ``.item()``), and the next layer's sequence length depends on it, so each image reads one count per cut
(``per_image`` plans run images one at a time); every other method's encoder work reads nothing per image.
"""

from __future__ import annotations

import torch

from .base import topk_sorted
from .encoder import EncoderCut, EncoderMethod, EncoderPlan, EncoderState, check_plan_layers, keep_with_cls
from .registry import register


def _share(x: torch.Tensor) -> torch.Tensor:
    """``x / x.sum()`` over the last dim, as the official code divides; a row summing to exactly 0 gives zeros."""
    total = x.sum(dim=-1, keepdim=True)
    return torch.where(total == 0, torch.zeros_like(x), x / torch.where(total == 0, torch.ones_like(total), total))


def flowcut_scores(cls_attention: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-layer scores [B, N] over patches, from CLS rows [B, H, 1+N] and values [B, H, 1+N, hd]."""
    v = values.float()
    att = cls_attention[:, :, 1:].float().mean(dim=1)
    rel = (v[:, :, :1] @ v.transpose(-1, -2)).squeeze(-2).softmax(dim=-1)[:, :, 1:].mean(dim=1)
    density = torch.linalg.vector_norm(v[:, :, 1:].mean(dim=1), ord=1, dim=-1)
    return (_share(att) + _share(rel)) * density


def normalised_entropy(cls_attention: torch.Tensor) -> torch.Tensor:
    """Entropy of the head-mean CLS attention over patches (renormalised by its sum), divided by log N: [B].

    An all-zero row has no distribution; it counts as uniform (1), which makes no intermediate cut.
    """
    att = cls_attention[:, :, 1:].float().mean(dim=1)
    n = att.shape[-1]
    p = _share(att)
    h = -torch.special.xlogy(p, p).sum(dim=-1)
    ratio = h / torch.log(torch.tensor(n, device=h.device)) if n > 1 else torch.zeros_like(h)
    return torch.where(att.sum(dim=-1) == 0, torch.ones_like(ratio), ratio)


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
        if feature_layer < 2:
            raise ValueError(
                f"{self.name} cuts before the layer that produces the features; hidden_states[{feature_layer}] "
                "leaves no earlier layer to cut after"
            )
        layers = check_plan_layers(range(0, feature_layer - 1), num_layers, feature_layer, self.name)
        return EncoderPlan(layers, cls_attention=True, values=True, per_image=True)

    def cut(self, state: EncoderState) -> EncoderCut | None:
        scores = flowcut_scores(state.cls_attention, state.values)
        mem = state.memory
        cum = scores if "score" not in mem else self.ema * mem["score"] + (1 - self.ema) * scores
        rpl = state.feature_layer - 2 - state.layer
        n, target = state.num_patches, state.target
        if rpl % 2:
            mem["score"] = cum
            return None
        if rpl == 0:
            count = target
        else:
            # the official arithmetic: a float32 tensor, rounded half to even; a batch takes its largest count
            r = normalised_entropy(state.cls_attention)
            drop = int(((n - target) / rpl**0.5 * (1 - r**2)).max().round())
            count = min(max(n - drop, target), n)
        kept = topk_sorted(cum, count)
        mem["score"] = torch.gather(cum, 1, kept)
        return EncoderCut(keep_with_cls(kept))
