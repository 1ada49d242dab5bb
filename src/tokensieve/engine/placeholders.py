"""Locate image placeholder runs in ``input_ids`` and shrink them to the kept token counts.

Spans come from ``input_ids == image_token_id`` per sample, never from fixed offsets, so any chat template, any
padding side and several images per prompt work the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import PlaceholderError
from .host import HostPrompt, to_device


@dataclass
class ImageSpan:
    """One image's placeholders: ``positions`` (host ints, ascending) in sample ``sample`` of the batch."""

    sample: int
    image: int
    positions: list[int]
    group: int | None = None
    """For families whose images span several placeholder runs (Idefics3's crops): the image this run belongs to,
    read off the prompt by the adapter's ``find_spans`` for this call."""


def find_image_spans(prompt, image_token_id: int, tokens_per_image: Sequence[int]) -> list[ImageSpan]:
    """Assign the placeholders of each sample, in reading order, to the images in the order they were given.

    ``prompt`` is the call's :class:`~tokensieve.engine.host.HostPrompt` (or ``input_ids``, read once here). This
    mirrors how the model scatters features (``masked_scatter`` fills placeholders in row-major order), and checks
    what the model would otherwise fail on later with a less helpful message.
    """
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 2:
            raise PlaceholderError(f"input_ids must be [batch, seq], got shape {tuple(prompt.shape)}")
        prompt = HostPrompt.of(prompt)
    where = [[i for i, t in enumerate(row) if t == image_token_id] for row in prompt.ids]
    total = sum(len(w) for w in where)
    expected = int(sum(tokens_per_image))
    if total != expected:
        raise PlaceholderError(
            f"input_ids hold {total} image placeholders (token id {image_token_id}) but the "
            f"{len(tokens_per_image)} image(s) given produce {expected} visual tokens; the prompt and the images "
            "do not match (was the text built by this model's processor?)"
        )
    spans: list[ImageSpan] = []
    image = 0
    for b, pos in enumerate(where):
        count, used = len(pos), 0
        while used < count:
            n = int(tokens_per_image[image])
            if used + n > count:
                raise PlaceholderError(
                    f"sample {b} has {count} image placeholders, which is not a whole number of images "
                    f"(image {image} needs {n} placeholders but only {count - used} remain)"
                )
            spans.append(ImageSpan(b, image, pos[used : used + n]))
            used += n
            image += 1
    return spans


@dataclass
class Compaction:
    """The shrunk batch and how to carry other per-token tensors along with it.

    ``rows``: per sample, the original position of each new slot (-1 for added padding), on the host; ``index``
    the same as one [B, L'] tensor on the prompt's device.
    """

    rows: list[list[int]]
    index: torch.Tensor
    left_padded: bool

    @property
    def kept_positions(self) -> list[torch.Tensor]:
        return [torch.tensor([p for p in row if p >= 0], dtype=torch.long) for row in self.rows]

    def apply(self, t: torch.Tensor, pad_value) -> torch.Tensor:
        """Gather a [B, L, ...] tensor into the new layout, filling added slots with ``pad_value``."""
        idx = self.index.clamp(min=0).to(t.device)
        view = idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
        out = torch.gather(t, 1, view)
        fill = (self.index < 0).to(t.device).view(*idx.shape, *([1] * (t.dim() - 2)))
        return out.masked_fill(fill, pad_value)

    def apply_host(self, rows: list[list], pad_value) -> list[list]:
        """The same gather on host lists (one per sample)."""
        return [[row[p] if p >= 0 else pad_value for p in new] for row, new in zip(rows, self.rows)]


def shrink_placeholders(
    prompt,
    spans: Sequence[ImageSpan],
    kept_counts: Sequence[int | Sequence[int]],
    left: bool | None = None,
    device=None,
) -> Compaction:
    """Keep the first ``kept_counts[i]`` placeholders of image i and drop the rest, then re-pad the batch.

    A sequence of ints instead of a count names the kept placeholders of that span (indices into
    ``span.positions``), for families whose visual tokens keep their own positions. Computed on the host from the
    call's :class:`~tokensieve.engine.host.HostPrompt`; the index goes to ``device`` in one copy.

    Samples can lose different numbers of tokens (different image counts), so the result is re-padded on the side
    the input was padded on (left when it had no padding, as generation needs), or on the left when ``left`` is
    true: generation appends after the last slot, so a right-padded prompt would be continued after its padding.
    """
    bsz, length = prompt.shape
    keep = [[True] * length for _ in range(bsz)]
    for span, k in zip(spans, kept_counts):
        row = keep[span.sample]
        if isinstance(k, int):
            dropped = span.positions[k:]
        else:
            named = set(k)
            dropped = [p for j, p in enumerate(span.positions) if j not in named]
        for p in dropped:
            row[p] = False
    right_padded = prompt.right_padded
    if left is None:
        left = not right_padded
    elif left and right_padded:  # the caller's right padding moves to the left with the new padding
        keep = [[k and r for k, r in zip(row, prompt.real(b))] for b, row in enumerate(keep)]
    kept = [[i for i, k in enumerate(row) if k] for row in keep]
    new_len = max(len(r) for r in kept)
    rows = [([-1] * (new_len - len(r)) + r) if left else (r + [-1] * (new_len - len(r))) for r in kept]
    return Compaction(rows=rows, index=to_device(rows, device or "cpu"), left_padded=left)
