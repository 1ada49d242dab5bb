"""DivPrune: keep a maximally diverse subset of the projected image tokens.

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025 (arXiv
2503.02175). Follows ``DivPrune`` in ``LLaVA/llava/model/llava_arch.py`` of the official code (vbdi/divprune @
799e2d95): greedy max-min (farthest-point) selection on cosine distance over the LM input embeddings of the image,
kept in sequence order. On the same inputs and the same k it keeps the same tokens.

Choices:

* Works after the projector, on the LM input embeddings, as the paper and the code do.
* The first pick is the most isolated token (largest distance to its nearest *other* token; the official code
  takes the second-smallest distance of each column, the smallest being the token itself); with a single
  candidate it is that candidate.
* A running minimum distance to the selected set makes the greedy loop O(N * k) after the O(N^2 d) matrix,
  instead of re-reducing over the whole selected set each step as the released code does (the same minimum).
* Picked tokens are masked explicitly instead of relying on their zero self-distance, so exact duplicates of a
  picked token (distance 0 as well) can still be chosen once everything else is exhausted and k == N returns
  every index. Ties go to the lowest index (``argmax``'s first maximum, as in the official code).

Deliberate difference from the official code: the budget is k tokens; the official code takes a ratio
(``SUBSET_RATIO``) and keeps ``round(ratio * N)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import POST_PROJECTOR, Method, Selection, Signals, check_k
from .registry import register


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """1 - cos between every pair of rows, [B, N, N], in float32."""
    unit = F.normalize(x.float(), dim=-1)
    return 1.0 - torch.bmm(unit, unit.transpose(1, 2))


def maxmin_select(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min picks on a [B, N, N] distance matrix, returned sorted, [B, k]."""
    b, n, _ = distances.shape
    eye = torch.eye(n, dtype=torch.bool, device=distances.device)
    nearest_other = distances.masked_fill(eye, float("inf")).amin(dim=-1)  # [B, N]
    first = nearest_other.argmax(dim=-1)  # N == 1: the only row, inf, index 0

    picked = torch.empty(b, k, dtype=torch.int64, device=distances.device)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=distances.device)
    rows = torch.arange(b, device=distances.device)
    picked[:, 0] = first
    chosen[rows, first] = True
    closest = distances[rows, first]  # [B, N] distance to the selected set
    for step in range(1, k):
        nxt = closest.masked_fill(chosen, float("-inf")).argmax(dim=-1)
        picked[:, step] = nxt
        chosen[rows, nxt] = True
        closest = torch.minimum(closest, distances[rows, nxt])
    return picked.sort(dim=-1).values


@register
class DivPrune(Method):
    name = "divprune"
    description = "Greedy max-min cosine diversity over the projected image tokens."
    stage = POST_PROJECTOR
    signals = ()

    def select(self, signals: Signals, k: int) -> Selection:
        n = signals.num_tokens
        check_k(k, n)
        return Selection(indices=maxmin_select(cosine_distances(signals.features), k))
