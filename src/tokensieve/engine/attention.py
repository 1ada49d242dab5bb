"""Attention read off q and k, without the encoder or LM switching to eager attention.

The models run on SDPA or FlashAttention, which never materialise attention maps. Methods that need attention get
it from the projections their layer computed anyway (captured by hooks): a rotary embedding to apply to them
(:func:`rotate`) and the attention each key *receives* (:func:`received_attention`), computed a chunk of query rows
at a time so memory stays O(chunk x T) instead of O(T^2). One implementation for every caller: the CLIP capture
(HiPrune's signal), Qwen-VL's merge units and Idefics3's padded crops (the CLS-free fallback), and the in-LLM stage.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 512
"""Query rows per chunk where a caller does not choose."""


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the rotate-half form (Llama, Qwen, their ViTs): ``cos`` / ``sin`` broadcast
    against ``x`` [..., head_dim] as the caller shapes them."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + turned * sin


def received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    chunk: int = QUERY_CHUNK,
    sum_heads: bool = False,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention each key receives, summed over query rows: q, k [..., H, T, head_dim] -> [..., H, T]
    (``sum_heads``: summed over heads too, [..., T]). Callers divide by what they average over.

    ``key_mask`` [..., T] (True: a real key) keeps padded keys out of every softmax; ``query_mask`` [..., T] leaves
    padded query rows out of the sum. Chunks are summed in order, so a caller's numbers do not depend on which
    other caller shares this function.
    """
    n = q.shape[-2]
    total = None
    for start in range(0, n, chunk):
        logits = q[..., start : start + chunk, :] @ k.transpose(-1, -2) * scale
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[..., None, None, :], float("-inf"))
        probs = logits.softmax(dim=-1)
        if query_mask is not None:
            probs = probs * query_mask[..., None, start : start + chunk, None]
        part = probs.sum(dim=(-3, -2)) if sum_heads else probs.sum(dim=-2)
        total = part if total is None else total + part
    return total
