"""ToDRE: diverse tokens before the LM, then all visual tokens leave the LM once the text stops looking at them.

Li et al., "Effective Visual Token Pruning via Token Diversity and Task Relevance" (ToDRE), arXiv 2505.18757 v2.
No official code was found (reference notes, section 20); this follows the paper's text and its Algorithm 1, with
the readings below.

Stage 1 (after the projector, in the LM embedding space): the pivot is the token with the highest head-mean [CLS]
attention of the vision encoder's last layer; then greedy max-sum diversification adds, k-1 times, the token whose
summed cosine similarity to the chosen set is lowest (O(n*k*d), no n x n matrix). ``objective="max_min"`` gives
the v1 paper's greedy k-center instead (lowest maximum similarity to the chosen set). Kept tokens are returned in
sequence order (the paper does not say; everything else in this library does so).

Stage 2 (in the LM, :class:`ToDRERelevance`): at the boundaries ``check_layers`` (depth fractions, default 7/8),
the attention of the layer before the boundary gives the share of text-query attention that lands on visual keys;
below ``tau`` (0.10) every visual token is removed for the rest of the LM. The paper also requires the
visual-to-text share to be small, but in a causal decoder whose image precedes the instruction visual queries
cannot see text keys, so that share is identically 0 and only the text-to-visual share is computed. Text queries
are the real tokens after the first visual token.

Budget: ``todre``'s budget is stage 1's, i.e. visual tokens entering the LM; stage 2 is a threshold rule and its
layer-averaged effect shows in the report (``llm_layer_visual_tokens``), not in the budget.
"""

from __future__ import annotations

import torch

from ..errors import MissingSignalError
from .base import POST_PROJECTOR, Method, Request, Selection, Signals, check_k, read_lists
from .llm import QUERY_TEXT, LLMMethod, LLMSignals
from .registry import register


class ToDRERelevance(LLMMethod):
    name = "todre-relevance"
    description = "in-LLM: drop all visual tokens when the text-to-visual attention share is below tau"
    signals = ("text-query attention (checked layers)",)
    query = QUERY_TEXT
    attention_from = "previous"
    budgeted = False

    def __init__(self, tau: float = 0.10, check_layers: tuple[float, ...] = (7 / 8,)) -> None:
        if not 0.0 < tau < 1.0:
            raise ValueError(f"todre tau must lie in (0, 1), got {tau!r}")
        check_layers = tuple(check_layers)
        if not check_layers or any(not 0.0 < f < 1.0 for f in check_layers):
            raise ValueError(f"todre check_layers must be depth fractions in (0, 1), got {check_layers!r}")
        self.tau = tau
        self.check_layers = check_layers

    def schedule(self, n, num_layers, target):
        layers = sorted({min(num_layers - 1, max(1, round(f * num_layers))) for f in self.check_layers})
        return [(layer, None) for layer in layers]

    def share(self, signals: LLMSignals) -> float:
        """Mean over heads and text queries of the attention mass on visual keys."""
        if signals.attention is None or signals.attention.shape[1] == 0:
            return 1.0  # no text after the image: nothing says the image is done with
        return float(signals.attention.float().sum(-1).mean())

    def select_llm(self, signals: LLMSignals, ks):
        return self.select_llm_batch([signals], [ks])[0]

    def select_llm_batch(self, signals, ks):
        # the decision needs each share on the host (it decides how long the sequence goes on): one read per batch
        shares = [self._share(sig) for sig in signals]
        values = (
            read_lists([torch.stack([s for s in shares if isinstance(s, torch.Tensor)])])
            if any(isinstance(s, torch.Tensor) for s in shares)
            else [[]]
        )
        read = iter(values[0])
        out = []
        for sig, share in zip(signals, shares):
            keep = (next(read) if isinstance(share, torch.Tensor) else share) >= self.tau
            device = sig.hidden.device
            out.append(
                [
                    torch.arange(n, device=device) if keep else torch.empty(0, dtype=torch.long, device=device)
                    for n in sig.segments
                ]
            )
        return out

    def _share(self, signals: LLMSignals):
        """The share as a device scalar (or 1.0 where there is no text after the image)."""
        if signals.attention is None or signals.attention.shape[1] == 0:
            return 1.0
        return signals.attention.float().sum(-1).mean()


@register
class ToDRE(Method):
    name = "todre"
    description = "max-sum diversity after the projector (CLS pivot) + in-LLM removal of all visual tokens below tau"
    stage = POST_PROJECTOR
    signals = ("projected tokens", "[CLS] attention (last encoder layer)", "text-query attention (7/8 depth)")
    param_help = {
        "objective": "'max_sum' (v2: lowest summed similarity) or 'max_min' (v1: greedy k-center)",
        "relevance": "run the in-LLM stage that drops every visual token once text stops attending to them",
        "tau": "in-LLM stage: drop all visual tokens when the text-to-visual attention share is below tau",
        "check_layers": "in-LLM stage: depth fractions of the LM where the share is checked",
    }

    def __init__(
        self,
        objective: str = "max_sum",
        relevance: bool = True,
        tau: float = 0.10,
        check_layers: tuple[float, ...] = (7 / 8,),
    ) -> None:
        if objective not in ("max_sum", "max_min"):
            raise ValueError(f"todre objective must be 'max_sum' (v2) or 'max_min' (v1), got {objective!r}")
        self.objective = objective
        self.relevance = relevance
        self._stage2 = ToDRERelevance(tau, check_layers) if relevance else None

    companion_switch = "relevance"

    def llm_companion(self) -> LLMMethod | None:
        return self._stage2

    def request(self, num_layers: int, feature_layer: int) -> Request:
        return Request(cls_attention=(num_layers - 1,))

    def select(self, signals: Signals, k: int) -> Selection:
        layer = signals.num_layers - 1
        if layer not in signals.cls_attention:
            raise MissingSignalError("todre needs the [CLS] attention of the vision encoder's last layer")
        x = torch.nn.functional.normalize(signals.features.float(), dim=-1)  # [B, N, d]
        b, n, _ = x.shape
        check_k(k, n)
        pivot = signals.cls_attention[layer].float().mean(1).argmax(-1)  # [B]
        rows = torch.arange(b, device=x.device)
        chosen = torch.zeros(b, n, dtype=torch.bool, device=x.device)
        chosen[rows, pivot] = True
        sim = (x @ x[rows, pivot].unsqueeze(-1)).squeeze(-1)  # [B, N]
        for _ in range(k - 1):
            c = sim.masked_fill(chosen, float("inf")).argmin(-1)
            chosen[rows, c] = True
            new = (x @ x[rows, c].unsqueeze(-1)).squeeze(-1)
            sim = sim + new if self.objective == "max_sum" else torch.maximum(sim, new)
        # exactly k per row: their indices in order, without reading the mask back (the greedy loop itself is all
        # device work, k - 1 steps, no host read)
        idx = torch.where(chosen, torch.arange(n, device=x.device), n).sort(dim=-1).values[:, :k]
        return Selection(indices=idx)
