"""LLaVA-NeXT anyres images: the packed layout, budgets per crop, selection and packing, shared by the transformers
adapter and the vLLM integration.

A NeXT image is a base view plus a grid of crops; the model packs their patches (unpadding the grid, an
``image_newline`` after each grid row). Both hosts read that layout off their *own* packing function run on patch
ids (:func:`layout`) and hand the same tensors to :func:`select_image`, so a method keeps the same tokens under
``Sieve`` and under vLLM. Torch-only (no transformers import).

Newline policy (``newlines``): which ``image_newline`` tokens enter the LM after selection.

* ``"rows"`` (default): the newline of a grid row is kept when that row keeps a token; keep-all equals the
  uncompressed model. The count an image keeps then depends on the selection.
* ``"all"``: every newline is kept, whatever the selection (FasterVLM's official NeXT code keeps them when present);
  keep-all equals the uncompressed model and the count is fixed by the image size and the budget.
* ``"none"``: no newline enters the LM (FlowCut's official multi-crop code inserts none); fixed count too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..budget import Budget, Scope
from ..methods.base import POST_PROJECTOR, Layout, Method, Request, Signals
from ..report import MergeGroups
from .select import select_each

NEWLINES = ("rows", "all", "none")


def check_newlines(newlines: str) -> str:
    if newlines not in NEWLINES:
        raise ValueError(f"newlines must be one of {list(NEWLINES)}, got {newlines!r}")
    return newlines


@dataclass
class Packed:
    """The packed layout of one image: per packed position, its crop (of this image) and patch, or a newline."""

    crop: torch.Tensor  # [L] crop index within the image, -1 for a newline
    patch: torch.Tensor  # [L] patch index within the crop (raster), -1 for a newline
    row: torch.Tensor  # [L] grid row a token belongs to / a newline closes; -1 for base-view tokens without one
    num_crops: int

    @property
    def num_newlines(self) -> int:
        return int((self.crop < 0).sum())


def crop_ids(num_crops: int, per_crop: int) -> torch.Tensor:
    """[crops, patches, 1] float64 ids (crop * per_crop + patch), to run a model's packing on; newline: -1."""
    crop = torch.arange(num_crops, dtype=torch.float64).view(num_crops, 1, 1).expand(num_crops, per_crop, 1)
    patch = torch.arange(per_crop, dtype=torch.float64).view(1, -1, 1).expand(num_crops, -1, 1)
    return crop * per_crop + patch


def layout(packed_ids: torch.Tensor, num_crops: int, per_crop: int) -> Packed:
    """The layout of one image from its packed ids (a model's own packing run on :func:`crop_ids`)."""
    flat = packed_ids.reshape(-1).long()
    is_nl = flat < 0
    crop = torch.where(is_nl, -1, flat // per_crop)
    patch = torch.where(is_nl, -1, flat % per_crop)
    row = torch.cumsum(is_nl.long(), 0) - is_nl.long()  # newlines seen before (a newline closes its row)
    if num_crops > 1:
        row = torch.where(crop == 0, -1, row)  # the base view of a multi-crop image has no newlines
    return Packed(crop, patch, row, num_crops)


def shares(budget: Budget, sizes: list[int], per_crop: int) -> list[int]:
    """Tokens per candidate set of one image (one set per crop, or one for the whole image under ``global``)."""
    if budget.scope == Scope.GLOBAL:
        return [budget.resolve(sum(sizes), what="each image")]
    if budget.is_ratio or budget.scope == Scope.CROP:
        if budget.is_ratio:
            return [budget.resolve(n, what="each crop") for n in sizes]
        if budget.is_adaptive:
            return [budget.resolve(per_crop, what="each crop").clamp(n) for n in sizes]
        return [min(int(budget.value), n) for n in sizes]
    total = budget.resolve(per_crop * len(sizes), what="each image")
    c = len(sizes)
    if budget.is_adaptive:  # mean, min and max shared over the crops, each crop adapting on its own
        return [t.clamp(n) for t, n in zip(total.split(c), sizes)]
    return [min(n, total // c + (1 if i < total % c else 0)) for i, n in enumerate(sizes)]


def candidate_sets(pk: Packed, scope: Scope, side: int):
    """Per candidate set: (crop, packed positions, patch ids, grid) of the surviving patches, raster order."""
    sets = []
    for c in range(pk.num_crops):
        where = (pk.crop == c).nonzero().flatten()
        patch = pk.patch[where]
        order = patch.argsort()
        where, patch = where[order], patch[order]
        rows = torch.unique(patch // side).numel()
        cols = torch.unique(patch % side).numel()
        if rows * cols != patch.numel():  # not a rectangle: describe it as one row
            rows, cols = 1, patch.numel()
        sets.append((c, where, patch, (rows, cols)))
    if scope != Scope.GLOBAL:
        return sets
    crops = torch.cat([torch.full_like(s[2], s[0]) for s in sets])
    return [(crops, torch.cat([s[1] for s in sets]), torch.cat([s[2] for s in sets]), (1, int(crops.numel())))]


def image_shares(pk: Packed, budget: Budget, side: int, per_crop: int) -> list[int]:
    return shares(budget, [int(s[2].numel()) for s in candidate_sets(pk, budget.scope, side)], per_crop)


def num_tokens(pk: Packed, budget: Budget, side: int, per_crop: int, newlines: str) -> int:
    """Tokens one image hands the LM, where that is fixed before selection (``newlines`` "all" or "none")."""
    if newlines == "rows":
        raise ValueError("with newlines='rows' the count depends on which rows keep a token")
    return sum(image_shares(pk, budget, side, per_crop)) + (pk.num_newlines if newlines == "all" else 0)


def assemble(
    pk: Packed, placed: dict[int, torch.Tensor], tail: list[torch.Tensor], newline: Callable, newlines: str = "rows"
) -> torch.Tensor:
    """Walk the packed order: kept tokens in place, newlines (``newline(p)``) as the policy says, then tokens
    without a grid position."""
    rows_kept = {int(pk.row[p]) for p in placed if int(pk.row[p]) >= 0}
    seq = []
    for p in range(pk.crop.numel()):
        if p in placed:
            seq.append(placed[p])
        elif int(pk.crop[p]) < 0 and (newlines == "all" or (newlines == "rows" and int(pk.row[p]) in rows_kept)):
            seq.append(newline(p))
    return torch.stack(seq + tail)


def select_image(
    method: Method,
    budget: Budget,
    request: Request,
    cap,
    feature_layers: list[int],
    pre: torch.Tensor,
    crop0: int,
    pk: Packed,
    packed: torch.Tensor,
    *,
    side: int,
    cls_offset: int,
    num_layers: int,
    attention: Callable,
    project: Callable[[torch.Tensor], torch.Tensor],
    newlines: str = "rows",
) -> tuple[torch.Tensor, list[int], int, list[int] | None]:
    """Select one image's tokens: ``(LM tokens in packed order, kept patch ids (crop * per_crop + patch), merged,
    merge groups per grid cell (``ImageReport.groups``, None when nothing merged))``.

    ``cap``: a :class:`tokensieve.engine.capture.Captured` of the tower run on all crops of the call (rows [crops, T]);
    ``pre``: the projector's input [crops, patches, d]; ``crop0``: this image's first crop among them; ``packed``:
    the model's packed output for this image (post-projector candidates and the newline vectors); ``attention(cap,
    layer)``: [crops, H, T] CLS attention (or a CLS-free tower's fallback); ``project``: the projector.
    """
    per_crop = side * side
    fl = feature_layers[-1]
    sets = candidate_sets(pk, budget.scope, side)
    ks = shares(budget, [int(s[2].numel()) for s in sets], per_crop)
    placed: dict[int, torch.Tensor] = {}  # packed position -> token
    tail: list[torch.Tensor] = []
    kept_ids: list[int] = []
    merged = 0
    groups = MergeGroups(pk.num_crops * per_crop)
    for (crop, where, patch, grid), k in zip(sets, ks):
        if k == 0:
            continue
        crop_g = crop + crop0 if isinstance(crop, torch.Tensor) else torch.full_like(patch, crop + crop0)
        tok = patch + cls_offset

        def rows(t):  # [crops, T, ...] -> [1, n, ...] for this set's candidates
            return t[crop_g, tok].unsqueeze(0)  # noqa: B023 (used within this iteration)

        if method.stage == POST_PROJECTOR:
            cand = packed[where].unsqueeze(0)
        else:
            cand = pre[crop_g, patch].unsqueeze(0)
        signals = Signals(
            features=cand,
            layout=Layout(grid, 0),
            num_layers=num_layers,
            feature_layer=fl,
            hidden_states={i: rows(cap.hidden_states[i]) for i in request.hidden_states},
            cls_attention={
                i: attention(cap, i)[crop_g, :, tok].transpose(0, 1).unsqueeze(0) for i in request.cls_attention
            },
            keys={i: cap.key_heads(i)[crop_g, :, tok].transpose(0, 1).unsqueeze(0) for i in request.keys},
            attention_received={
                i: cap.attention_received(i)[crop_g, tok].unsqueeze(0) for i in request.attention_received
            },
            cls_hidden=torch.cat([cap.hidden_states[i][crop_g[0], 0] for i in feature_layers], dim=-1)[None]
            if request.cls_hidden and cls_offset
            else None,
        )
        sel = select_each(method, signals, k)[0]  # one set; an adaptive target gets its count here
        out = sel.output(cand)[0]
        if method.stage != POST_PROJECTOR:
            out = project(out.to(pre.dtype))
        merged += sel.num_merged
        if sel.tokens is None or sel.indices.shape[1] == out.shape[0]:
            anchors = sel.indices[0]
        else:
            anchors = sel.anchors[0] if sel.anchors is not None else torch.full((out.shape[0],), -1)
        for j, a in enumerate(anchors.tolist()):
            if a < 0:
                tail.append(out[j])
            else:
                placed[int(where[a])] = out[j]
        cells = (crop_g - crop0) * per_crop + patch
        kept_ids += cells[sel.indices[0]].tolist()
        groups.add(cells, sel.indices[0], None if sel.groups is None else sel.groups[0], out.shape[0])
    feats = assemble(pk, placed, tail, lambda p: packed[p], newlines).to(packed.dtype)
    return feats, sorted(kept_ids), merged, groups.result()


__all__ = [
    "NEWLINES",
    "Packed",
    "assemble",
    "candidate_sets",
    "check_newlines",
    "crop_ids",
    "image_shares",
    "layout",
    "num_tokens",
    "select_image",
    "shares",
]
