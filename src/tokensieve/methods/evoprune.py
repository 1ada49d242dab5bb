"""EvoPrune-style: score-guided hierarchical merging inside the vision encoder, on a skip schedule.

Inspired by EvoPrune (Chen et al., arXiv 2603.03681). Neither the paper body nor code was available to us, so this
is *our reading* of what the abstract and third-party summaries establish (reference notes, methods.md section
2.1): pruning at selected encoder layers on a skip schedule, guided by attention importance, similarity and
diversity, with low-scoring tokens merged hierarchically. Treat numbers from it as "EvoPrune-style", not as the
paper's method.

The reading implemented:

* Schedule: layers ``start, start + step, ...`` up to ``end`` (default: the layer producing the feature layer).
  ``start`` defaults to a quarter of the encoder depth (layer 6 of CLIP-L's 24): the earliest layers barely mix
  tokens yet, so their scores say little. The patch count after event ``e`` of ``E`` is geometric,
  ``round(N * (T / N) ** (e / E))``, so every event removes the same fraction and the last one lands on ``T``.
* Score of a patch: ``w_att * Î + w_div * D̂``. ``I`` is the head-mean CLS attention at that layer (computed from
  its q/k: the CLS query row only), ``R`` the largest cosine similarity of the patch's head-mean key to any other
  patch's (redundancy), ``D = 1 - R`` (diversity); ``^`` is min-max scaling over the image's patches, so the two
  weights trade comparable ranges. Keys rather than hidden states carry the similarity, as in ToMe.
* Merging: each dropped patch goes into its most similar kept patch (same key cosine); a destination becomes the
  size-weighted mean of itself and everything assigned to it, and sizes add, so a token merged twice still counts
  every original patch once (sizes always sum to the original count). CLS is never scored, dropped or merged into.
* Not implemented: ToMe's proportional attention (log size added to the attention logits), which would need an
  attention mask in every later layer; the encoder keeps running mask-free on SDPA.

Counts depend only on the schedule, never on the image, so batches run batched.
"""

from __future__ import annotations

import torch

from .base import topk_sorted
from .encoder import EncoderCut, EncoderMethod, EncoderPlan, EncoderState, check_plan_layers, keep_with_cls
from .registry import register


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def evoprune_scores(cls_attention: torch.Tensor, keys: torch.Tensor, w_att: float, w_div: float):
    """Composite scores [B, N] and the patch-patch key cosine [B, N, N], from CLS rows [B, H, 1+N] and keys."""
    att = cls_attention[:, :, 1:].float().mean(dim=1)
    k = keys[:, :, 1:].float().mean(dim=1)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = k @ k.transpose(1, 2)
    n = sim.shape[-1]
    redundancy = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=sim.device), float("-inf")).amax(dim=-1)
    if n == 1:
        redundancy = torch.zeros_like(att)
    return w_att * _minmax(att) + w_div * _minmax(1 - redundancy), sim


@register
class EvoPrune(EncoderMethod):
    name = "evoprune"
    description = "EvoPrune-style: merge low attention+diversity patches into similar ones on a skip schedule."
    signals = ("CLS attention (scheduled layers)", "keys (scheduled layers)")
    param_help = {
        "start_layer": "first encoder layer (0-based) that prunes; None: a quarter of the encoder depth",
        "end_layer": "last pruning layer; None: the layer producing the LM's features",
        "step": "prune every STEP-th layer from start_layer to end_layer",
        "w_att": "weight of the CLS-attention importance in the score",
        "w_div": "weight of the key diversity (1 - max similarity) in the score",
        "merge": "merge dropped patches into their most similar kept one (False: just drop them)",
        "skip_unused_layers": "stop the encoder after the layer the LM reads (no output changes; saves compute)",
    }

    def __init__(
        self,
        start_layer: int | None = None,
        end_layer: int | None = None,
        step: int = 2,
        w_att: float = 0.5,
        w_div: float = 0.5,
        merge: bool = True,
        skip_unused_layers: bool = True,
    ):
        for name, v in (("start_layer", start_layer), ("end_layer", end_layer)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {v!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be a positive int, got {step!r}")
        for name, v in (("w_att", w_att), ("w_div", w_div)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if w_att + w_div <= 0:
            raise ValueError("w_att + w_div must be positive")
        self.start_layer, self.end_layer, self.step = start_layer, end_layer, step
        self.w_att, self.w_div = float(w_att), float(w_div)
        self.merge = bool(merge)
        self.skip_unused_layers = bool(skip_unused_layers)

    def layers(self, num_layers: int, feature_layer: int) -> tuple[int, ...]:
        last = feature_layer - 1  # the layer producing the features: the last one whose output may be cut
        end = last if self.end_layer is None else self.end_layer
        if not 0 <= end <= last:
            raise ValueError(
                f"evoprune end_layer={end} must be in [0, {last}] (no cut after the layer producing the features)"
            )
        if self.start_layer is not None and self.start_layer > end:
            raise ValueError(f"evoprune start_layer={self.start_layer} must be in [0, {end}] (end_layer={end})")
        start = min(num_layers // 4, end) if self.start_layer is None else self.start_layer
        return check_plan_layers(range(start, end + 1, self.step), num_layers, feature_layer, self.name)

    def plan(self, num_layers: int, feature_layer: int) -> EncoderPlan:
        return EncoderPlan(self.layers(num_layers, feature_layer), cls_attention=True, keys=True)

    def cut(self, state: EncoderState) -> EncoderCut:
        events = self.layers(state.num_layers, state.feature_layer)
        n0, target, n = state.layout.num_patches, state.target, state.num_patches
        e = events.index(state.layer) + 1
        count = max(target, min(n, round(n0 * (target / n0) ** (e / len(events)))))
        if e == len(events):
            count = target
        scores, sim = evoprune_scores(state.cls_attention, state.keys, self.w_att, self.w_div)
        kept = topk_sorted(scores, count)  # [B, count] patch indices
        keep = keep_with_cls(kept)
        if not self.merge:
            return EncoderCut(keep)
        b, _, d = state.hidden.shape
        dropped_mask = torch.ones(b, n, dtype=torch.bool, device=kept.device)
        dropped_mask.scatter_(1, kept, False)
        # each patch's most similar kept patch, as a slot 0..count-1 of ``kept``
        to_kept = torch.gather(sim, 2, kept.unsqueeze(1).expand(-1, n, -1))  # [B, N, count]
        slot = to_kept.argmax(dim=-1)
        slot = torch.where(
            dropped_mask, slot, torch.searchsorted(kept, torch.arange(n, device=kept.device).expand(b, -1).contiguous())
        )
        sizes = state.sizes[:, 1:].float()
        x = state.hidden[:, 1:].float() * sizes.unsqueeze(-1)
        mass = torch.zeros(b, count, device=x.device).scatter_add_(1, slot, sizes)
        total = torch.zeros(b, count, d, device=x.device).scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, d), x)
        merged = total / mass.unsqueeze(-1)
        hidden = torch.cat([state.hidden[:, :1].float(), merged], dim=1)
        out_sizes = torch.cat([state.sizes[:, :1].float(), mass], dim=1)
        return EncoderCut(keep, hidden=hidden, sizes=out_sizes, groups=slot)
