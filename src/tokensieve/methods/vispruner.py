"""VisPruner: important tokens by [CLS] attention, then diverse tokens by removing duplicates among the rest.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs" (ICCV
2025), official code Theia-4869/VisPruner (``llava/model/llava_arch.py::encode_images``). Behaviour follows that
code; the implementation here is our own.

The algorithm, for a budget of k tokens and an important ratio r (official default 0.5):

1. Rank the candidates by the head-mean [CLS] attention of the layer that produces the LM's features (the same
   row FasterVLM uses, ``feature_layer - 1``). The first ``int(k * r)`` are the *important* tokens.
2. The others stay in that attention order as the *residual*. While more than ``k - int(k * r)`` remain, split
   the residual alternately into A (positions 0, 2, 4, ...) and B (1, 3, 5, ...), give each A token its highest
   cosine similarity to any B token (on the pre-projector features, L2-normalised), and drop the ``step`` most
   similar A tokens, ``step = min(8, residual - wanted)``. The surviving A tokens, ordered from most to least
   similar, followed by B in its order, form the next residual (that order decides the next split, as in the
   official code). Tokens are dropped, never merged.
3. Keep important + residual, in raster order.

Deliberate differences from the official code, each where that code is silent or fails:

* **Ties** in both sorts go to the lower position (stable sort): the official ``argsort`` leaves the order of
  equal values to the kernel.
* **Odd residuals and large steps.** The official indexing assumes the residual has an even length and that a
  step drops at most half of it; otherwise it raises a shape error (or, when the residual is odd and the step is
  exactly half of it rounded down, silently drops one token too many). This happens at ordinary budgets: on a
  144-token grid, k = 18 leaves an odd residual of 135; on a 576-token grid, k = 9 ends with a step of 7 on a
  residual of 12. We do what every other step does: drop the ``step`` most similar A tokens, or all of A when it
  is smaller, so the method always keeps exactly k.
* **Numerics**: similarities in float32 whatever the model dtype (the official code runs in the model's fp16);
  normalisation uses ``F.normalize`` (an all-zero feature gets similarity 0 instead of NaN).
* **CLS as a candidate** (LLaVA's ``full`` feature strategy): ranked like any candidate by its own attention
  entry, as FasterVLM does here; the official code's ``cls_patch`` path does not run.
* **CLS-free towers** (SigLIP, Qwen's ViT): the adapters' [CLS]-attention fallback (mean attention each token
  receives) ranks the important tokens, exactly as for FasterVLM and VisionZip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PRE_PROJECTOR, Selection, Signals, check_k
from .fastervlm import FasterVLM
from .registry import register

MAX_STEP = 8
"""Most A tokens one matching round drops (the official constant)."""


def split_budget(k: int, important_ratio: float) -> tuple[int, int]:
    """``(important, diverse)`` counts for a budget of k: ``int(k * r)`` important, the rest diverse."""
    important = int(k * important_ratio)
    return important, k - important


def remove_duplicates(unit: torch.Tensor, residual: torch.Tensor, wanted: int) -> torch.Tensor:
    """Shrink ``residual`` [B, R] (indices into ``unit`` [B, N, d], unit-norm rows) to ``wanted`` by bipartite rounds.

    Returns the surviving indices [B, wanted] in the order the last round left them (not sorted).
    """
    while wanted > 0:
        r = residual.shape[1]
        step = min(MAX_STEP, r - wanted)
        if step <= 0:
            break
        a_idx, b_idx = residual[:, ::2], residual[:, 1::2]
        a = torch.gather(unit, 1, a_idx.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
        bb = torch.gather(unit, 1, b_idx.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
        similarity = torch.bmm(a, bb.transpose(1, 2)).amax(dim=-1)  # [B, |A|]
        order = torch.argsort(similarity, dim=-1, descending=True, stable=True)
        survivors = order[:, min(step, a_idx.shape[1]) :]  # the most similar A tokens go
        residual = torch.cat([torch.gather(a_idx, 1, survivors), b_idx], dim=1)
    return residual


@register
class VisPruner(FasterVLM):
    """FasterVLM's scoring (layer, signal, checks) with VisPruner's important / diverse split on top."""

    name = "vispruner"
    description = "Important tokens by [CLS] attention, then diverse ones by dropping near-duplicates of the rest."
    stage = PRE_PROJECTOR
    signals = ("CLS attention (feature layer)", "vision features")
    param_help = {
        "important_ratio": "share of the budget taken by [CLS] attention (the official important_ratio); the rest "
        "goes to diverse tokens",
        "layer": "encoder layer (0-based) whose CLS attention ranks patches; None: the layer producing the features",
    }

    def __init__(self, important_ratio: float = 0.5, layer: int | None = None):
        if (
            isinstance(important_ratio, bool)
            or not isinstance(important_ratio, (int, float))
            or not (0.0 <= float(important_ratio) <= 1.0)
        ):
            raise ValueError(f"important_ratio must be a number in [0, 1], got {important_ratio!r}")
        super().__init__(layer)
        self.important_ratio = float(important_ratio)

    def select(self, signals: Signals, k: int) -> Selection:
        check_k(k, signals.num_tokens)
        scores = self.scores(signals)
        important, diverse = split_budget(k, self.important_ratio)
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        kept = order[:, :important]
        if diverse > 0:
            unit = F.normalize(signals.features.float(), dim=-1)
            kept = torch.cat([kept, remove_duplicates(unit, order[:, important:], diverse)], dim=1)
        return Selection(indices=kept.sort(dim=-1).values, scores=scores)
