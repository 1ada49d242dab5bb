"""Selection over Qwen-VL merge units, shared by the transformers adapter and the vLLM integration.

A Qwen-VL ViT runs on patches; its merger turns each 2x2 block of patches (a merge unit) into one LM token, so a
unit is the smallest thing a method can keep. Both hosts run their own ViT and hand this module the same per-patch
tensors in the processor's raster order (:class:`UnitSignals`); everything from there on (pooling signals per unit,
the CLS-free attention fallback, the method's call, placing created tokens, ordering by position) happens here once,
so a method keeps the same units under ``Sieve`` and under vLLM.

Torch-only (no transformers import): the vLLM environment installs core without its transformers pin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import BudgetError
from ..methods.base import POST_PROJECTOR, Layout, Method, Request, Signals
from ..report import MergeGroups
from .attention import QUERY_CHUNK, received_attention
from .attention import rotate as rope
from .select import select_each


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The vision rotary on [P, H, hd] with [P, hd] cos / sin."""
    return rope(x, cos.unsqueeze(-2), sin.unsqueeze(-2))


def segment_received(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean softmax attention each key receives over all queries of one attention segment: [H, P].

    q / k: [P, H, hd] with the vision RoPE applied.
    """
    qh, kh = q.transpose(0, 1), k.transpose(0, 1)  # [H, P, hd]
    return received_attention(qh, kh, scale, chunk=QUERY_CHUNK) / qh.shape[1]


@dataclass
class UnitSignals:
    """One vision forward's per-patch tensors, rows in raster order (window order already undone).

    ``units_in``: the merger's input rows [P, d] (before its norm); ``merged``: its output [P / unit, d_out];
    ``hidden``: hidden_states index -> [P, d]; ``qk``: block -> (q with RoPE, k with RoPE, k before RoPE, scale),
    each [P, H, hd].
    """

    units_in: torch.Tensor
    merged: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    qk: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)


def select_units(
    method: Method,
    k: int,
    request: Request,
    sig: UnitSignals,
    *,
    thw: tuple[int, int, int],
    patch_offset: int,
    merge: int,
    frames: int,
    num_layers: int,
    project: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, int, list[int] | None]:
    """Select ``k`` units in each of ``frames`` candidate sets of one image or video (``thw`` patches starting at
    ``patch_offset``): ``(LM tokens [n_kept, d_out], their unit index within the item (sorted), units merged,
    merge groups per unit (``ImageReport.groups``, None when nothing merged))``. ``k`` may be an adaptive target:
    each frame then gets its own count.

    Pre-projector methods select on the merger's input units (4 patch rows concatenated); their kept and created
    units go through ``project`` (the host's merger). Post-projector methods select on the merger's output.
    Signals are pooled per unit (mean over its patches); CLS attention is the CLS-free fallback, the mean attention
    a unit's patches receive within their attention segment (an image, or one temporal patch of a video).
    """
    t, h, w = thw
    unit = merge * merge
    hu, wu = h // merge, w // merge
    n = t * hu * wu // frames
    seg = slice(patch_offset, patch_offset + t * h * w)
    useg = slice(patch_offset // unit, (patch_offset + t * h * w) // unit)

    def units(x: torch.Tensor) -> torch.Tensor:  # per-patch rows of this item -> [frames, n, ..] unit means
        x = x[seg]
        return x.reshape(frames, n, unit, *x.shape[1:]).float().mean(dim=2)

    if method.stage == POST_PROJECTOR:
        cand = sig.merged[useg].reshape(frames, n, -1)
    else:
        cand = sig.units_in[seg].reshape(frames, n, -1)
    cls_attention, keys, received = {}, {}, {}
    for layer, (q, k_rot, k_raw, scale) in sig.qk.items():
        if layer in request.cls_attention or layer in request.attention_received:
            q, k_rot = q[seg], k_rot[seg]
            span = h * w
            rec = torch.cat(
                [segment_received(q[i : i + span], k_rot[i : i + span], scale) for i in range(0, t * span, span)],
                dim=1,
            )  # [H, t*h*w]
            heads = rec.shape[0]
            per_unit = rec.reshape(heads, frames, n, unit).mean(-1).transpose(0, 1)  # [frames, H, n]
            if layer in request.cls_attention:
                cls_attention[layer] = per_unit
            if layer in request.attention_received:  # HiPrune's signal itself: received attention, head mean
                received[layer] = per_unit.mean(1)
        if layer in request.keys:
            keys[layer] = units(k_raw).transpose(1, 2)  # [frames, H, n, hd]: keys before RoPE, by content
    signals = Signals(
        features=cand,
        layout=Layout((n // wu, wu), 0),
        num_layers=num_layers,
        feature_layer=num_layers,
        hidden_states={i: units(sig.hidden[i]) for i in request.hidden_states},
        cls_attention=cls_attention,
        keys=keys,
        attention_received=received,
        cls_hidden=None,
    )
    sels = select_each(method, signals, k)  # one per frame (frames may keep different counts when adaptive)
    wheres, outs = [], []
    groups = MergeGroups(frames * n)
    for f, sel in enumerate(sels):
        out = sel.output(cand[f : f + 1])[0]
        groups.add(f * n + torch.arange(n), sel.indices[0], None if sel.groups is None else sel.groups[0], sel.num_out)
        if sel.tokens is None or sel.indices.shape[1] == out.shape[0]:
            where = sel.indices[0]
        elif sel.anchors is not None and bool((sel.anchors >= 0).all()):
            where = sel.anchors[0]
        else:
            raise BudgetError(
                f"{method.name} created tokens without a grid position; Qwen-VL needs one position per token"
            )
        wheres.append(where + f * n)  # item-level unit index
        outs.append(out)
    where, out = torch.cat(wheres), torch.cat(outs)
    order = where.argsort()
    where, out = where[order], out[order]
    if bool((where[1:] == where[:-1]).any()):
        raise BudgetError(f"{method.name} placed two tokens at one position; Qwen-VL needs distinct positions")
    if method.stage != POST_PROJECTOR:
        out = project(out.to(sig.units_in.dtype))
    return out.to(sig.merged.dtype), where, sum(sel.num_merged for sel in sels), groups.result()


__all__ = ["UnitSignals", "select_units", "segment_received", "rotate", "QUERY_CHUNK"]
