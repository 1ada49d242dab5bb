"""Average pooling of the patch grid: the spatial-downsampling baseline.

Not a single paper's method; 2-D average pooling is the standard content-agnostic baseline in token-compression
comparisons (and what LLaVA-OneVision's video path does). Choices:

* The pooled grid (h', w') is the factor pair of the grid budget with h' <= h, w' <= w whose aspect ratio is
  closest to h / w in log space; ties go to the taller grid. A budget with no such pair is an error rather than an
  approximation, so "k tokens" always means exactly k.
* Pooling windows are those of ``adaptive_avg_pool2d`` (they may overlap or differ in size by one when h' does not
  divide h).
* Non-grid prefix candidates (a CLS token fed to the LM) are kept untouched in front and count towards k.
* ``indices`` name, for each pooled cell, the patch at the centre of its window (index-space centre, rounded
  down), so reports and position ids have a representative location; the tokens themselves are the means.
* Keeping every grid patch is the identity: no token is created and the output is the input, bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import BudgetError
from .base import PRE_PROJECTOR, Method, Selection, Signals, check_k
from .registry import register


def pooled_grid(k: int, grid: tuple[int, int]) -> tuple[int, int]:
    """(h', w') with h' * w' == k that fits in ``grid`` and best keeps its aspect ratio."""
    h, w = grid
    target = math.log(h / w)
    best = None
    for rows in range(1, k + 1):
        if k % rows:
            continue
        cols = k // rows
        if rows > h or cols > w:
            continue
        # sort key: aspect error first, then prefer more rows
        key = (abs(math.log(rows / cols) - target), -rows)
        if best is None or key < best[0]:
            best = (key, (rows, cols))
    if best is None:
        raise BudgetError(
            f"k={k} grid tokens cannot be laid out as an h' x w' grid inside the {h}x{w} patch grid; "
            "choose a budget with a fitting factorisation"
        )
    return best[1]


def _window_centres(size: int, out: int) -> list[int]:
    # adaptive pooling window i covers [floor(i*size/out), ceil((i+1)*size/out))
    centres = []
    for i in range(out):
        start = (i * size) // out
        end = -((-(i + 1) * size) // out)
        centres.append((start + end - 1) // 2)
    return centres


@register
class Pool(Method):
    name = "pool"
    description = "2-D average pooling of the patch grid down to k tokens (content-agnostic baseline)."
    stage = PRE_PROJECTOR
    any_count = False  # k must factor into a grid that fits
    signals = ()

    def select(self, signals: Signals, k: int) -> Selection:
        n = signals.num_tokens
        check_k(k, n)
        layout = signals.layout
        prefix = layout.num_prefix
        h, w = layout.grid
        if prefix + h * w != n:
            raise ValueError(f"layout {layout} describes {prefix + h * w} candidates, features have {n}")
        if k <= prefix:
            raise BudgetError(
                f"pool keeps the {prefix} prefix token(s) as they are, so k must exceed {prefix}, got {k}"
            )
        grid_k = k - prefix
        features = signals.features
        device = features.device
        if grid_k == h * w:
            return Selection(indices=torch.arange(n, device=device).unsqueeze(0).expand(signals.batch, -1).contiguous())

        rows, cols = pooled_grid(grid_k, (h, w))
        b, _, d = features.shape
        grid = features[:, prefix:].float().reshape(b, h, w, d).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(grid, (rows, cols)).flatten(2).transpose(1, 2)  # [B, h'*w', d] raster
        # math in float32, result in the input dtype so it can stand in for the features downstream
        tokens = torch.cat([features[:, :prefix], pooled.to(features.dtype)], dim=1)

        centres = [prefix + r * w + c for r in _window_centres(h, rows) for c in _window_centres(w, cols)]
        keep = list(range(prefix)) + centres
        assert all(a < b for a, b in zip(keep, keep[1:])), "pooled-cell centres must be strictly increasing"
        indices = torch.tensor(keep, dtype=torch.int64, device=device).unsqueeze(0).expand(b, -1).contiguous()
        # patch (r, c) lies in window (r * rows // h, c * cols // w); where windows overlap this picks one of them
        r = torch.arange(h, device=device) * rows // h
        c = torch.arange(w, device=device) * cols // w
        cell = (prefix + r[:, None] * cols + c[None, :]).flatten()
        groups = torch.cat([torch.arange(prefix, device=device), cell]).unsqueeze(0).expand(b, -1).contiguous()
        return Selection(indices=indices, tokens=tokens, num_merged=grid_k, groups=groups)
