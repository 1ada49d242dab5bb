"""Per-patch targets for the training-only losses, read off the pixels the vision tower sees.

A shapes scene knows which object and which digit drew every pixel, and an easy-VQA image's own answers name its
one shape, so each patch can be told what it shows (colour, shape, digit), which instance it belongs to, where it is
and which of its sub-cells are drawn, in the tower's own row-major patch order. Only training reads these; nothing
here touches a model.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..data import easyvqa, shapes

AUX_COLOURS = tuple(sorted(set(shapes.COLOURS) | easyvqa.COLOURS))
AUX_SHAPES = tuple(sorted(set(shapes.SHAPES) | {"rectangle"}))
AUX_HEADS = {"colour": len(AUX_COLOURS) + 1, "shape": len(AUX_SHAPES) + 1, "digit": 11, "quadrant": 5}
"""Per-patch training targets for the vision tower; class 0 of each is "nothing of that kind here" (quadrant: the
patch's own quadrant 1-4, in :data:`shapes.QUADRANTS` order, and only with ``aux_quadrant``)."""
TARGET_ROWS = {"colour": 0, "shape": 1, "digit": 2, "object": 3, "digit_instance": 4, "quadrant": 5, "mask": 6}
"""Rows of a target tensor: the heads' classes, which object (1..) and which digit (1..) each patch belongs to
(0: none, for the pooled loss), the patch's quadrant, then from row 6 on the patch's drawn-pixel mask, one row per
sub-cell (:func:`mask_side`)."""
POOLED = {"colour": "object", "shape": "object", "digit": "digit_instance"}
"""Heads the pooled loss reads per instance, and the row that says which patches make one instance."""
IGNORE = -100
WORD_TARGETS = {"colour": AUX_COLOURS, "shape": AUX_SHAPES, "row": ("top", "bottom"), "column": ("left", "right")}
"""The words :meth:`PatchProbe.word_loss` scores patches against, in target-class order (``aux_words``)."""


def mask_side(patch: int, size: int) -> int:
    """Sub-cells per patch side for the mask target: cells of about 2 x 2 pixels of the 96-px scene, at most
    ``patch // 2`` (4 x 4 per 8-px patch at 96 px, 2 x 2 per 14-px patch at 336 px)."""
    return max(1, min(patch // 2, round(patch * shapes.IMAGE_SIZE / size / 2)))


def _mask_rows(drawn: np.ndarray, patch: int, size: int) -> torch.Tensor:
    """``[side * side, patches]``: 1 where at least half of a sub-cell's pixels are drawn (``drawn``: ``[size,
    size]``)."""
    m = mask_side(patch, size)
    cells = _per_patch(drawn, patch).reshape(-1, patch, patch)[:, : patch // m * m, : patch // m * m]
    blocks = cells.reshape(len(cells), m, patch // m, m, patch // m).mean((2, 4))
    return torch.from_numpy((blocks >= 0.5).reshape(len(cells), m * m).T.astype(np.int64))


def _per_patch(pixels: np.ndarray, patch: int) -> np.ndarray:
    """``[H, W, ...]`` to ``[patches, patch * patch, ...]`` in the vision tower's row-major patch order."""
    side = pixels.shape[0] // patch
    rest = pixels.shape[2:]
    cut = pixels[: side * patch, : side * patch].reshape(side, patch, side, patch, *rest)
    return cut.swapaxes(1, 2).reshape(side * side, patch * patch, *rest)


def _min_pixels(per_8px_patch: int, patch: int) -> int:
    """A pixel threshold given for 8-px patches, kept as the same share of a ``patch``-px patch."""
    return max(1, round(per_8px_patch * patch * patch / 64))


def scene_targets(scene, patch: int, size: int = shapes.IMAGE_SIZE, min_pixels: int | None = None) -> torch.Tensor:
    """``[rows, patches]`` colour / shape / digit class of what each patch mostly shows (shapes scenes), which
    object and which digit it belongs to, its quadrant and drawn-pixel mask (:data:`TARGET_ROWS`).

    A patch takes the object (or digit) with the most pixels in it if it covers at least ``min_pixels`` (default:
    4 of an 8-px patch's 64, the same share for other patch sizes), so the 7 px shapes still label the patches they
    sit in (their shape is ignored: nobody asks it). ``size`` is the side the processor resizes images to.
    """
    return _targets(shapes.label_map(scene), scene.objects, {shapes.DIGIT_LABEL: scene.digit}, patch, size, min_pixels)


def sheet_targets(sheet, patch: int, size: int = shapes.IMAGE_SIZE, min_pixels: int | None = None) -> torch.Tensor:
    """As :func:`scene_targets`, for a training sheet of many digits and shapes (:func:`shapes.sheet`)."""
    digits = {shapes.SHEET_DIGIT + j: d for j, (d, _, _) in enumerate(sheet.digits)}
    return _targets(shapes.sheet_labels(sheet), sheet.objects, digits, patch, size, min_pixels)


def _targets(
    labels: np.ndarray, objects, digits: dict[int, int], patch: int, size: int, min_pixels: int | None
) -> torch.Tensor:
    """Per-patch targets from a label map: object ``k`` is label ``k + 1``, ``digits`` maps labels to digits."""
    min_pixels = _min_pixels(4, patch) if min_pixels is None else min_pixels
    if size != labels.shape[0]:
        labels = np.asarray(Image.fromarray(labels).resize((size, size), Image.NEAREST))
    cells = _per_patch(labels, patch)
    out = torch.zeros(5, cells.shape[0], dtype=torch.long)
    extra = [quadrant_targets(size // patch)[None], _mask_rows(labels > 0, patch, size)]
    ink = np.zeros(cells.shape[0], dtype=np.int64)  # the most pixels any one digit has in each patch
    for j, (label, d) in enumerate(digits.items()):
        count = (cells == label).sum(1)
        more = torch.from_numpy((count >= min_pixels) & (count > ink))
        out[2, more] = d + 1
        out[4, more] = j + 1
        ink = np.maximum(ink, count)
    best = np.zeros(cells.shape[0], dtype=np.int64)
    for k, o in enumerate(objects):
        count = (cells == k + 1).sum(1)
        mine = torch.from_numpy((count >= min_pixels) & (count >= ink) & (count > best))
        out[0, mine] = AUX_COLOURS.index(o.colour) + 1
        # no question asks the shape of a tiny (7-9 px) object, and at that size a circle is nearly a square
        out[1, mine] = AUX_SHAPES.index(o.shape) + 1 if o.size >= shapes.SHAPE_MIN else IGNORE
        out[3, mine] = k + 1
        best = np.maximum(best, count)
    return torch.cat([out, *extra])


def quadrant_targets(side: int) -> torch.Tensor:
    """``[side * side]``: each patch's quadrant, 1-4 in :data:`shapes.QUADRANTS` order (row-major patches).

    Shapes objects never cross the midlines, and with an even grid no patch does either, so for an object's patches
    this is also the object's quadrant.
    """
    rows = torch.arange(side)[:, None].expand(side, side)
    cols = torch.arange(side)[None, :].expand(side, side)
    return (1 + (cols >= side // 2).long() + 2 * (rows >= side // 2).long()).flatten()


def easyvqa_targets(
    image, colour: str | None, shape: str | None, size: int, patch: int, min_pixels: int | None = None
) -> torch.Tensor:
    """``[rows, patches]`` (:data:`TARGET_ROWS`) for an easy-VQA image: one shape on a plain background (the
    border's commonest colour).

    Patches the shape covers (default: 8 pixels of an 8-px patch, the same share for other sizes) take its colour /
    shape class when the image's own questions name them (unknown: ignored); easy-VQA has no digits, so that head
    learns "none" there.
    """
    min_pixels = _min_pixels(8, patch) if min_pixels is None else min_pixels
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.NEAREST)).astype(np.int32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    fg = np.abs(pixels - colours[counts.argmax()]).sum(-1) > 60
    on = torch.from_numpy(_per_patch(fg, patch).sum(1) >= min_pixels)
    out = torch.zeros(5, on.numel(), dtype=torch.long)
    for row, value, names in ((0, colour, AUX_COLOURS), (1, shape, AUX_SHAPES)):
        out[row, on] = names.index(value) + 1 if value is not None else IGNORE
    out[3, on] = 1  # one object
    return torch.cat([out, quadrant_targets(size // patch)[None], _mask_rows(fg, patch, size)])
