"""FastV: after decoder layer K, keep the visual tokens the last prompt token attended to most.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (FastV). Follows ``fastv_forward`` in the llava-hf
``modeling_llama.py`` of the official code (pkunlp-icler/FastV @ d1659729): layer K-1's attention probabilities
(head mean) of the last real token to the visual tokens score them, the top k stay from layer K on, in sequence
order, with their original RoPE positions. The paper's text describes the average over all query tokens; the
KV-cache implementation uses the last token, and so do we. On the same inputs and the same k it keeps the same
tokens.

Budget mapping: papers quote FastV at 192/128/64 as the *layer-averaged* number of visual tokens, so a budget T
for an image of n tokens on an L-layer LM keeps ``k = round((T*L - K*n) / (L - K))`` from layer K on (LLaVA-1.5-7B,
L=32, K=2, n=576: 192 -> 166, 128 -> 98, 64 -> 30; FastV's own R=50% is k=288, i.e. an average of 306). A budget
below ``K*n/L`` cannot be reached without moving K and is refused.

Deliberate differences from the official code: the count comes from that budget instead of the official
``round(n * (1 - R))``; several images in one prompt each keep their own k; exact ties go to the lower index.
"""

from __future__ import annotations

from ..errors import BudgetError
from .llm import QUERY_LAST, LLMMethod, LLMSignals, per_segment_topk
from .registry import register


def single_boundary(n: int, num_layers: int, target: int, layer: int, name: str) -> list[tuple[int, int]]:
    """Keep count from ``layer`` on that makes the layer average ``target`` (shared by one-boundary methods)."""
    if not 0 < layer < num_layers:
        raise BudgetError(
            f"{name} layer={layer} must lie in 1..{num_layers - 1} for a {num_layers}-layer LM (the "
            "first decoder layer run without the pruned tokens)"
        )
    k = round((target * num_layers - layer * n) / (num_layers - layer))
    if k < 1:
        floor = -(-(layer * n + num_layers - layer) // num_layers)
        earlier = [e for e in range(layer - 1, 0, -1) if round((target * num_layers - e * n) / (num_layers - e)) >= 1]
        if earlier:
            fix = (
                f"prune after an earlier layer: layer={earlier[0]} reaches it (Sieve({name!r}, {target}, "
                f"layer={earlier[0]}); on the command line --param {name}.layer={earlier[0]})"
            )
        else:
            fix = (
                f"no layer reaches it; raise the budget to at least {-(-(n + num_layers - 1) // num_layers)}, or "
                f"select before the LM (--method evocut+{name} --budget {min(n, 2 * target)}+{target})"
            )
        raise BudgetError(
            f"{name} prunes after layer {layer}, so {n} visual tokens run through {layer} of {num_layers} layers: "
            f"a layer-averaged budget of {target} is out of reach (at least {floor}); {fix}"
        )
    return [(layer, min(k, n))]


@register
class FastV(LLMMethod):
    name = "fastv"
    description = "in-LLM: after layer K, keep visual tokens with the most last-token attention at layer K-1"
    signals = ("last-token attention (layer K-1)",)
    param_help = {
        "layer": "K: the first decoder layer run without the pruned tokens (scored by layer K-1's attention)",
    }
    query = QUERY_LAST
    attention_from = "previous"

    def __init__(self, layer: int = 2) -> None:
        if not isinstance(layer, int) or layer < 1:
            raise ValueError(
                f"fastv layer must be an int >= 1 (the first layer run without pruned tokens), got {layer!r}"
            )
        self.layer = layer

    def schedule(self, n, num_layers, target):
        return single_boundary(n, num_layers, target, self.layer, self.name)

    def select_llm(self, signals: LLMSignals, ks):
        scores = signals.attention.float().mean(dim=(0, 1))  # heads and (one) query row
        return per_segment_topk(scores, signals.segments, ks)
