"""DART: after decoder layer K, keep visual tokens that duplicate a few pivots least. Attention-free.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More" (DART).
Follows ``get_retained_image_token`` in ``llava/model/language_model/modeling_llama_self.py`` of the official code
(read in the xqy1111111/DART fork @ d6a5af6f; its Qwen2-VL / Qwen2.5-VL files use the same rule); on the same
inputs it keeps the same tokens, apart from the differences listed at the end.

* Pivots: the ``pivots_image`` visual tokens and the ``pivots_text`` text tokens *after the image* (the question
  and the assistant prefix; nothing before the image) with the largest L1 norm of their keys at layer K-1
  (post-RoPE, heads concatenated).
* Each pivot then claims, in turn, the free visual tokens least similar to it: cosine similarity of the hidden
  states entering layer K *after the LM's final norm* (the official code normalises them before comparing), and
  a claimed token leaves the pool. Image pivots are never claimable. Kept: the visual pivots plus the claimed
  tokens, in sequence order.
* Walk order: the official code walks a Python ``set`` of the pivots' sequence positions (built from the image
  pivots, then the text pivots, each in descending key norm). For integer positions that order is fixed for a
  given set (CPython's hash table order, not sorted order) and it decides which pivot claims a token both would
  want; it is reproduced here by building the same set from the same positions (counted among the sample's real
  tokens, so padding does not move them).

Budget mapping as FastV (one boundary at K=2; LLaVA-1.5-7B 192/128/64 -> 166/98/30 from layer 2 on). Several
images in one prompt are selected one by one, each with its own pivots; text pivots come from the text after that
image.

Deliberate differences from the official code, and why:

* Counts: the official code gives every pivot ``max_num_trunction // (pivots_image + pivots_text)`` claims, so it
  keeps about k + 4 tokens (132 for its default 128). Here exactly k are kept: the ``k - pivots_image`` claims are
  spread over the pivots in walk order (the first ``(k - p) % P`` pivots claim one more), so budgets compare
  exactly with other methods. When ``k - pivots_image`` is a multiple of the pivot count the kept set is the
  official one (e.g. k = 132 against ``max_num_trunction`` = 128).
* Fewer than ``pivots_text`` text tokens after the image (or none) give that many text pivots; the official code
  fails there.
* Keys are read as the KV cache holds them, one copy per KV head; the official code sums the per-query-head copies
  (grouped-query LMs), the same ranking up to float rounding. Exact ties in the claims go to the lower index.

Host reads: the walk order is a Python set of integer positions, so the pivots' indices must be read on the host;
:meth:`DART.select_llm_batch` reads every image's pivots of the whole batch in one transfer and runs the claims on
the device.
"""

from __future__ import annotations

import torch

from .base import read_lists, topk_sorted
from .fastv import single_boundary
from .llm import LLMMethod, LLMSignals
from .registry import register


def _ints(x) -> list[int]:
    """Positions as host ints: the stage hands them over as lists where it knows them (no device read)."""
    return x.tolist() if isinstance(x, torch.Tensor) else [int(v) for v in x]


def _l1(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.float(), ord=1, dim=-1)


@register
class DART(LLMMethod):
    name = "dart"
    description = "in-LLM: key-norm pivots, keep visual tokens least duplicated by them (attention-free)"
    signals = ("keys (layer K-1)", "final-normed hidden states (layer K)")
    param_help = {
        "layer": "K: the first decoder layer run without the pruned tokens",
        "pivots_image": "visual pivot tokens (largest key L1 norm), always kept",
        "pivots_text": "text pivot tokens whose duplicates are also avoided",
    }
    needs_keys = True
    final_norm = True

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
        return self.select_llm_batch([signals], [ks])[0]

    def select_llm_batch(self, signals: list[LLMSignals], ks):
        """Two phases so the whole batch reads the device once: the pivots of every image (device), one read of
        the pivots' indices (the walk order is a Python set of their positions), then the claims (device)."""
        pending, reads = [], []
        for sig, k_img in zip(signals, ks):
            n_all = sig.hidden.shape[0]
            positions = _ints(sig.positions) if sig.positions is not None else list(range(n_all))
            text_keys = sig.text_keys if sig.text_keys is not None else torch.empty(0, 1)
            text_pos = sig.text_positions
            text_pos = list(range(n_all, n_all + text_keys.shape[0])) if text_pos is None else _ints(text_pos)
            images, start = [], 0
            for n, k in zip(sig.segments, k_img):
                pos = positions[start : start + n]
                key = sig.keys[start : start + n]
                p = min(self.pivots_image, k)
                after = [i for i, t in enumerate(text_pos) if n and t > max(pos)]
                t = min(self.pivots_text, len(after))
                piv = _l1(key).topk(p).indices
                reads.append(piv)
                if t:
                    where = torch.tensor(after, device=text_keys.device)
                    reads.append(where[_l1(text_keys[where]).topk(t).indices])
                images.append((start, n, k, pos, p, t))
                start += n
            pending.append((sig, text_pos, images))
        values = iter(read_lists(reads))
        out = []
        for sig, text_pos, images in pending:
            hidden = sig.hidden.float()
            text_hidden = sig.text_hidden
            kept = []
            for start, n, k, pos, p, t in images:
                hid = hidden[start : start + n]
                piv = next(values)
                vectors = {pos[i]: hid[i] for i in piv}
                order = [pos[i] for i in piv]
                for i in next(values) if t else []:
                    vectors[text_pos[i]] = text_hidden[i].float()
                    order.append(text_pos[i])
                walk = list(set(order))  # the official order: a set of integer positions, as CPython iterates it
                taken = torch.zeros(n, dtype=torch.bool, device=hid.device)
                taken[torch.tensor(piv, dtype=torch.long, device=hid.device)] = True
                picks = k - p
                for j, q in enumerate(walk):  # pivot j claims its share of the least similar free tokens
                    share = picks // len(walk) + (1 if j < picks % len(walk) else 0)
                    if share == 0:
                        continue
                    unlike = -torch.nn.functional.cosine_similarity(vectors[q][None].to(hid), hid, dim=-1)
                    taken[topk_sorted(unlike.masked_fill(taken, float("-inf"))[None], share)[0]] = True
                # exactly k are taken: their indices in order, without reading the mask back
                kept.append(torch.where(taken, torch.arange(n, device=hid.device), n).sort().values[:k])
            out.append(kept)
        return out
