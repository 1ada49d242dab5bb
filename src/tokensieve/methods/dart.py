"""DART: after decoder layer K, keep visual tokens that duplicate a few pivots least. Attention-free.

Pivots are the ``pivots_image`` visual and ``pivots_text`` text tokens with the largest L1 norm of their keys at
layer K-1 (post-RoPE, heads concatenated, as the KV cache holds them). Each pivot then claims, in turn, the
remaining visual tokens least similar to it (cosine on the hidden states entering layer K), and a claimed token
leaves the pool. Kept: the visual pivots plus the claimed tokens, in sequence order.

Counts (our reading): the reference code keeps about k + 4 tokens (``k // 8`` per pivot plus the 4 visual pivots);
here exactly k are kept, the k - pivots_image picks spread over the pivots in turn, so budgets compare exactly
with other methods. Budget mapping as FastV (one boundary at K=2; LLaVA-1.5-7B 192/128/64 -> 166/98/30 from
layer 2 on). Text pivots come from the whole prompt (system and question tokens).
"""

from __future__ import annotations

import torch

from . import register
from .base import LLMMethod, LLMSignals
from .fastv import single_boundary


@register
class DART(LLMMethod):
    name = "dart"
    description = "in-LLM: key-norm pivots, keep visual tokens least duplicated by them (attention-free)"
    signals = ("keys (layer K-1)", "hidden states (layer K)")
    param_help = {
        "layer": "K: the first decoder layer run without the pruned tokens",
        "pivots_image": "visual pivot tokens (largest key L1 norm), always kept",
        "pivots_text": "text pivot tokens whose duplicates are also avoided",
    }
    needs_keys = True

    def __init__(self, layer: int = 2, pivots_image: int = 4, pivots_text: int = 4) -> None:
        if not isinstance(layer, int) or layer < 1:
            raise ValueError(f"dart layer must be an int >= 1, got {layer!r}")
        if pivots_image < 1 or pivots_text < 0:
            raise ValueError("dart needs at least one image pivot and a non-negative number of text pivots")
        self.layer = layer
        self.pivots_image = pivots_image
        self.pivots_text = pivots_text

    def schedule(self, n, num_layers, target):
        return single_boundary(n, num_layers, target, self.layer, self.name)

    def select_llm(self, signals: LLMSignals, ks):
        out = []
        keys = signals.split(signals.keys.float(), dim=0)
        hidden = signals.split(signals.hidden.float(), dim=0)
        text_piv = torch.empty(0, signals.hidden.shape[1])
        if self.pivots_text and signals.text_keys is not None and signals.text_keys.shape[0]:
            t = min(self.pivots_text, signals.text_keys.shape[0])
            idx = signals.text_keys.float().abs().sum(-1).topk(t).indices
            text_piv = signals.text_hidden.float()[idx]
        for key, hid, k in zip(keys, hidden, ks):
            n = hid.shape[0]
            p = min(self.pivots_image, k)
            piv = key.abs().sum(-1).topk(p).indices
            pivots = torch.cat([hid[piv], text_piv.to(hid)], dim=0)
            sim = torch.nn.functional.normalize(pivots, dim=-1) @ torch.nn.functional.normalize(hid, dim=-1).T
            taken = torch.zeros(n, dtype=torch.bool)
            taken[piv] = True
            picks = k - p
            for j in range(pivots.shape[0]):  # pivot j claims its share of the least similar free tokens
                share = picks // pivots.shape[0] + (1 if j < picks % pivots.shape[0] else 0)
                if share == 0:
                    continue
                s = sim[j].masked_fill(taken, float("inf"))
                taken[s.topk(share, largest=False).indices] = True
            out.append(taken.nonzero().flatten())
        return out
