"""VisionZip: a few dominant tokens by [CLS] attention, plus contextual tokens that merge the rest.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025. Follows the
LLaVA-1.5 path of the official code (dvlab-research/VisionZip @ 3151f6df: ``visionzip/clip_encoder.py``, the
head-mean keys of ``visionzip/utils.py``, and ``main.py``, which counts the CLS among the dominant tokens): on the
same inputs it keeps the same dominant patches and builds the same contextual tokens (to float rounding). The code
here is our own.

Choices:

* Signals come from the layer that produces the LM's features (``feature_layer - 1``): CLS attention summed over
  heads ranks the dominant patches; keys averaged over heads, then L2-normalised, drive the merge.
* The budget k counts *every* output token: [CLS hidden state?, dominant patches (raster), contextual tokens].
* ``contextual=None`` gives C = round(k * 5 / 32), the paper's splits 64 = 54 + 10, 128 = 108 + 20,
  192 = 162 + 30; at least one contextual token once k >= 2, none for k = 1.
* With ``include_cls`` the CLS hidden state is the first output token and counts as one dominant token. If the
  encoder has no CLS (``cls_hidden`` is None) all D dominant slots go to patches instead. If the CLS is already a
  candidate (``layout.num_prefix > 0``), those prefix candidates are forced into the dominant set rather than
  being added a second time.
* Contextual targets are taken at a fixed index stride ``max(1, n_rem // C)`` over the remaining candidates in
  raster order; each other remaining candidate joins the target with the most similar key; a contextual token is
  the target's feature *plus* the mean of its members' features (the target alone when it has none).
* k >= N leaves nothing to merge, so the result is the identity (all candidates, no created token).

Deliberate differences from the official code: it takes the dominant and contextual counts as two arguments, here
they come from one budget (above); with a contextual count of 0 it divides by zero, here k >= 2 always gets at
least one contextual token; exact ties go to the lower index. Towers without a CLS and CLS candidates are cases
the official code does not cover.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MissingSignalError
from .base import PRE_PROJECTOR, Method, Request, Selection, Signals, check_k, gather_tokens, topk_sorted
from .registry import register


def default_contextual(k: int) -> int:
    """Contextual share of a budget, matching the paper's published splits."""
    c = round(k * 5 / 32)
    return max(1, c) if k >= 2 else c


@register
class VisionZip(Method):
    name = "visionzip"
    description = "Dominant tokens by [CLS] attention plus contextual tokens merging the rest by key similarity."
    stage = PRE_PROJECTOR
    signals = ("CLS attention (feature layer)", "keys (feature layer)", "CLS hidden state")
    param_help = {
        "contextual": "contextual (merged) tokens out of the budget; None: round(k * 5 / 32), the paper's split",
        "include_cls": "keep the CLS hidden state as the first dominant token",
    }

    def __init__(self, contextual: int | None = None, include_cls: bool = True):
        if contextual is not None and (
            isinstance(contextual, bool) or not isinstance(contextual, int) or contextual < 0
        ):
            raise ValueError(f"contextual must be a non-negative int or None, got {contextual!r}")
        if not isinstance(include_cls, bool):
            raise ValueError(f"include_cls must be a bool, got {include_cls!r}")
        self.contextual = contextual
        self.include_cls = include_cls

    def request(self, num_layers: int, feature_layer: int) -> Request:
        layer = feature_layer - 1
        if not 0 <= layer < num_layers:
            raise ValueError(f"visionzip needs feature_layer in [1, {num_layers}], got {feature_layer}")
        return Request(cls_attention=(layer,), keys=(layer,), cls_hidden=self.include_cls)

    def select(self, signals: Signals, k: int) -> Selection:
        n = signals.num_tokens
        b = signals.batch
        features = signals.features
        device = features.device
        check_k(k, n)
        if k == n:
            return Selection(indices=torch.arange(n, device=device).unsqueeze(0).expand(b, -1).contiguous())

        layer = signals.feature_layer - 1
        if layer not in signals.cls_attention or layer not in signals.keys:
            raise MissingSignalError(f"visionzip needs the CLS attention and keys of encoder layer {layer}")

        prefix = signals.layout.num_prefix
        forced = prefix if self.include_cls else 0
        use_cls_hidden = self.include_cls and prefix == 0 and signals.cls_hidden is not None
        extra = 1 if use_cls_hidden else 0

        contextual = default_contextual(k) if self.contextual is None else self.contextual
        num_dominant = k - contextual - extra  # dominant candidates (forced prefix included)
        if num_dominant < forced or num_dominant < 0:
            raise ValueError(
                f"contextual={contextual} leaves {k - contextual} slot(s) of k={k}, fewer than the "
                f"{extra + forced} CLS token(s) that must be kept"
            )

        attention = signals.cls_attention[layer].float().sum(dim=1)  # [B, N]
        if forced:
            attention[:, :forced] = float("inf")
        dominant = topk_sorted(attention, num_dominant)  # [B, D] ascending

        parts = []
        if use_cls_hidden:
            cls = signals.cls_hidden
            if cls.shape != (b, features.shape[-1]):
                raise ValueError(f"cls_hidden has shape {tuple(cls.shape)}, expected ({b}, {features.shape[-1]})")
            parts.append(cls.unsqueeze(1).to(features.dtype))
        parts.append(gather_tokens(features, dominant))

        groups = torch.full((b, n), -1, dtype=torch.long, device=device)
        groups.scatter_(
            1, dominant, (extra + torch.arange(dominant.shape[1], device=device)).expand(b, -1).contiguous()
        )
        targets = dominant[:, :0]
        if contextual > 0:
            merged, assigned, targets = self._contextual(signals, layer, dominant, contextual)
            parts.append(merged.to(features.dtype))
            groups = torch.where(assigned >= 0, extra + dominant.shape[1] + assigned, groups)
        if extra == 0 and contextual == 0:
            return Selection(indices=dominant, scores=attention if not forced else None)
        return Selection(
            indices=dominant,
            tokens=torch.cat(parts, dim=1),
            num_merged=contextual + extra,
            scores=None if forced else attention,
            groups=groups,
            # a contextual token stands at its target; the CLS hidden state stands nowhere in the grid (-1)
            anchors=torch.cat([dominant.new_full((b, extra), -1), dominant, targets], dim=1),
        )

    @staticmethod
    def _contextual(signals: Signals, layer: int, dominant: torch.Tensor, contextual: int):
        """Merge every non-dominant candidate into one of ``contextual`` strided targets.

        Returns the contextual tokens [B, C, d], per candidate its contextual slot (-1 for dominant ones), and the
        targets [B, C] (the candidate each contextual token stands at).
        """
        features = signals.features.float()
        b, n, d = features.shape
        ar = torch.arange(n, device=features.device).expand(b, -1)
        is_dominant = torch.zeros(b, n, dtype=torch.bool, device=features.device)
        is_dominant.scatter_(1, dominant, True)
        n_rem = n - dominant.shape[1]
        # push dominant indices past the end, so the first n_rem of the sort are the rest in raster order
        remaining = torch.where(is_dominant, ar + n, ar).sort(dim=1).values[:, :n_rem]

        step = max(1, n_rem // contextual)
        target_pos = torch.arange(0, n_rem, step, device=features.device)[:contextual]
        is_target = torch.zeros(n_rem, dtype=torch.bool, device=features.device)
        is_target[target_pos] = True
        other_pos = torch.arange(n_rem, device=features.device)[~is_target]
        targets = remaining[:, target_pos]  # [B, C]
        others = remaining[:, other_pos]  # [B, n_rem - C]

        keys = F.normalize(signals.keys[layer].float().mean(dim=1), dim=-1)  # [B, N, hd]
        similarity = torch.bmm(gather_tokens(keys, others), gather_tokens(keys, targets).transpose(1, 2))
        assign = similarity.argmax(dim=-1)  # [B, n_rem - C] -> target slot

        sums = torch.zeros(b, contextual, d, dtype=features.dtype, device=features.device)
        sums.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, d), gather_tokens(features, others))
        counts = torch.zeros(b, contextual, dtype=features.dtype, device=features.device)
        counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=features.dtype))
        slot = torch.full((b, n), -1, dtype=torch.long, device=features.device)
        slot.scatter_(1, targets, torch.arange(contextual, device=features.device).expand(b, -1).contiguous())
        slot.scatter_(1, others, assign)
        return gather_tokens(features, targets) + sums / counts.clamp_min(1.0).unsqueeze(-1), slot, targets
