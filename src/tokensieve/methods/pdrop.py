"""PyramidDrop: several in-LLM boundaries, each keeping a geometrically smaller share of the visual tokens.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction". Follows ``pdrop_rank_drop`` in ``llava/model/modeling_llama_pdrop.py`` of the official code
(Cooperx521/PyramidDrop @ 6444f304). At each boundary the boundary layer's own input norm and q/k projections
(RoPE applied) score the visual tokens by the attention of the last instruction token (the prompt's last token;
head mean, softmax over the whole causal row, not renormalised); the top ``lambda**s * n`` stay (cumulative
ratios), in sequence order. The published LLaVA-1.5 setting is boundaries at layers 8/16/24 of 32 with lambda 0.5
(a layer average of 270 of 576). With ``ratio`` the counts are ``int(n * lambda**s)`` (rounded down, at least 1),
as the official ratio list gives them.

Budget mapping (our reading; PyramidDrop's 192/128/64 rows in other papers tune layers and ratios by hand):
the boundaries stay at the published depth fractions ``layers`` and lambda is solved so the layer-averaged count
equals the budget (counts rounded to nearest). When the budget is below what those boundaries can reach (the first
stage alone keeps n tokens for a quarter of the depth), the boundaries move to the "early" schedule: first at
layer 2, the others evenly spaced over the rest of the depth, and lambda is solved again. ``ratio`` fixes lambda
instead (budget ignored for the ratio, boundaries as given).

Deliberate differences from the official code, and why:

* Positions: the official code renumbers the sequence contiguously after every boundary, so later layers, and the
  scoring at the next boundary, run with shifted RoPE phases. Here kept tokens keep their original phases, as in
  FastV's and DART's code: one in-LLM stage serves every method and family (Qwen's M-RoPE ids cannot be
  renumbered that way). The first boundary scores exactly as the official code; from the second one on, on a real
  model, the scores see slightly different hidden states and keys.
* The official code takes its boundaries and ratios as lists; here they come from depth fractions and a budget
  (above), or ``ratio``. Exact ties go to the lower index.
"""

from __future__ import annotations

import math

from ..errors import BudgetError
from .llm import QUERY_LAST, LLMMethod, LLMSignals, averaged_tokens, per_segment_topk
from .registry import register


def _plan(n: int, layers: list[int], lam: float) -> list[tuple[int, int]]:
    return [(layer, max(1, round(n * lam ** (s + 1)))) for s, layer in enumerate(layers)]


@register
class PyramidDrop(LLMMethod):
    name = "pdrop"
    description = "in-LLM: boundaries at depth fractions, cumulative ratios lambda^s, last-instruction attention"
    signals = ("last-instruction-token attention (boundary layer q/k)",)
    param_help = {
        "layers": "boundaries as increasing depth fractions of the LM, e.g. (0.25, 0.5, 0.75)",
        "ratio": (
            "lambda, the keep ratio per boundary (cumulative); None: solved so the layer average meets the budget"
        ),
        "early_first_layer": (
            "first boundary of the fallback schedule used when the budget is below what `layers` reach"
        ),
    }
    query = QUERY_LAST
    attention_from = "current"

    def __init__(
        self, layers: tuple[float, ...] = (0.25, 0.5, 0.75), ratio: float | None = None, early_first_layer: int = 2
    ) -> None:
        layers = tuple(layers)
        if not layers or any(not 0.0 < f < 1.0 for f in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"pdrop layers must be increasing depth fractions in (0, 1), got {layers!r}")
        if ratio is not None and not 0.0 < ratio < 1.0:
            raise ValueError(f"pdrop ratio (lambda) must lie in (0, 1), got {ratio!r}")
        self.layers = layers
        self.ratio = ratio
        self.early_first_layer = early_first_layer

    def boundaries(self, num_layers: int, early: bool = False) -> list[int]:
        if early:
            first, s = self.early_first_layer, len(self.layers)
            out = [first] + [first + round((num_layers - first) * i / s) for i in range(1, s)]
        else:
            out = [round(f * num_layers) for f in self.layers]
        if out[0] < 1 or out[-1] >= num_layers or len(set(out)) != len(out):
            raise BudgetError(
                f"pdrop boundaries at layers {out} do not fit a {num_layers}-layer LM: each of the {len(out)} "
                "boundaries "
                f"needs its own layer in 1..{num_layers - 1}; give fewer depth fractions (layers=...; on the command "
                "line e.g. --param pdrop.layers=(0.5,)) or a deeper LM"
            )
        return out

    def schedule(self, n, num_layers, target):
        layers = self.boundaries(num_layers)
        if self.ratio is not None:  # the official counts: int() of the original count times the cumulative ratio
            return [(layer, max(1, int(n * self.ratio ** (s + 1)))) for s, layer in enumerate(layers)]
        floor, misfit = None, ""
        for early in (False, True):
            try:
                layers = self.boundaries(num_layers, early)
            except BudgetError:
                misfit = (
                    f"; its fallback schedule from early_first_layer={self.early_first_layer} does not fit "
                    f"{num_layers} layers"
                )
                break
            lowest = averaged_tokens(n, num_layers, _plan(n, layers, 1e-9))
            if floor is None or lowest < floor[0]:
                floor = (lowest, layers)
            lo, hi = 0.0, 1.0
            if lowest > target:
                continue  # even dropping everything at the first boundary averages too much
            for _ in range(60):
                mid = (lo + hi) / 2
                if averaged_tokens(n, num_layers, _plan(n, layers, mid)) > target:
                    hi = mid
                else:
                    lo = mid
            return _plan(n, layers, lo)
        least = math.ceil(floor[0])
        earlier = (
            " move the first boundary earlier (early_first_layer=1; on the command line --param "
            "pdrop.early_first_layer=1),"
            if floor[1][0] > 1
            else ""
        )
        raise BudgetError(
            f"pdrop cannot average {target} visual tokens per layer on this {num_layers}-layer LM: with boundaries at "
            f"layers {floor[1]} it keeps at least {least} of {n}{misfit}; raise the budget to at least {least},"
            f"{earlier} or select before the LM (--method evocut+pdrop --budget {min(n, 2 * target)}+{target})"
        )

    def select_llm(self, signals: LLMSignals, ks):
        scores = signals.attention.float().mean(dim=(0, 1))
        return per_segment_topk(scores, signals.segments, ks)
