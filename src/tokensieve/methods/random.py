"""Random selection: the floor any informed method has to beat.

Not from a paper; it is the usual sanity baseline in token-pruning ablations. Choices: the subset is drawn from a
fresh ``torch.Generator`` seeded with ``seed`` on every call, and the *same* subset is used for every image of a
batch. Both make the baseline a fixed function of (N, k, seed): a batch gives exactly what single-image calls
give, and reruns of an evaluation reproduce, independently of any global RNG state the caller touches.
"""

from __future__ import annotations

import torch

from .base import PRE_PROJECTOR, Method, Selection, Signals, check_k
from .registry import register


@register
class RandomSelect(Method):
    name = "random"
    description = "Keep a uniformly random subset of the tokens (seeded, same subset for every image)."
    stage = PRE_PROJECTOR
    signals = ()
    param_help = {"seed": "seed of the random subset (the same positions for every image)"}

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed

    def select(self, signals: Signals, k: int) -> Selection:
        n = signals.num_tokens
        check_k(k, n)
        # a CPU generator gives the same draw whatever device the features live on
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        keep = torch.randperm(n, generator=generator)[:k].sort().values
        indices = keep.to(signals.features.device).unsqueeze(0).expand(signals.batch, -1).contiguous()
        return Selection(indices=indices)
