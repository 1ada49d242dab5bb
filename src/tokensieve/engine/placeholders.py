"""Locate image placeholder runs in ``input_ids`` and shrink them to the kept token counts.

Spans come from ``input_ids == image_token_id`` per sample, never from fixed offsets, so any chat template, any
padding side and several images per prompt work the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import PlaceholderError


@dataclass
class ImageSpan:
    """One image's placeholders: ``positions`` in sample ``sample`` of the batch."""

    sample: int
    image: int
    positions: torch.Tensor
    group: int | None = None
    """For families whose images span several placeholder runs (Idefics3's crops): the image this run belongs to,
    read off the prompt by the adapter's ``find_spans`` for this call."""


def find_image_spans(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: Sequence[int]) -> list[ImageSpan]:
    """Assign the placeholders of each sample, in reading order, to the images in the order they were given.

    This mirrors how the model scatters features (``masked_scatter`` fills placeholders in row-major order), and
    checks what the model would otherwise fail on later with a less helpful message.
    """
    if input_ids.dim() != 2:
        raise PlaceholderError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    is_img = input_ids == image_token_id
    counts = is_img.sum(dim=1).tolist()
    total = sum(counts)
    expected = int(sum(tokens_per_image))
    if total != expected:
        raise PlaceholderError(
            f"input_ids hold {total} image placeholders (token id {image_token_id}) but the "
            f"{len(tokens_per_image)} image(s) given produce {expected} visual tokens; the prompt and the images "
            "do not match (was the text built by this model's processor?)"
        )
    spans: list[ImageSpan] = []
    image = 0
    for b, count in enumerate(counts):
        pos = is_img[b].nonzero().squeeze(-1)
        used = 0
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
    """The shrunk batch and how to carry other per-token tensors along with it."""

    index: torch.Tensor  # [B, L'] original position of each new slot, -1 for added padding
    left_padded: bool

    @property
    def kept_positions(self) -> list[torch.Tensor]:
        return [row[row >= 0] for row in self.index]

    def apply(self, t: torch.Tensor, pad_value) -> torch.Tensor:
        """Gather a [B, L, ...] tensor into the new layout, filling added slots with ``pad_value``."""
        idx = self.index.clamp(min=0).to(t.device)
        view = idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
        out = torch.gather(t, 1, view)
        fill = (self.index < 0).to(t.device).view(*idx.shape, *([1] * (t.dim() - 2)))
        return out.masked_fill(fill, pad_value)


def shrink_placeholders(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    spans: Sequence[ImageSpan],
    kept_counts: Sequence[int | torch.Tensor],
    left: bool | None = None,
) -> Compaction:
    """Keep the first ``kept_counts[i]`` placeholders of image i and drop the rest, then re-pad the batch.

    A tensor instead of a count names the kept placeholders of that span (indices into ``span.positions``), for
    families whose visual tokens keep their own positions.

    Samples can lose different numbers of tokens (different image counts), so the result is re-padded on the side
    the input was padded on (left when it had no padding, as generation needs), or on the left when ``left`` is
    true: generation appends after the last slot, so a right-padded prompt would be continued after its padding.
    """
    bsz, length = input_ids.shape
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for span, k in zip(spans, kept_counts):
        if isinstance(k, torch.Tensor):
            drop = torch.ones(span.positions.numel(), dtype=torch.bool, device=span.positions.device)
            drop[k.to(span.positions.device)] = False
            keep[span.sample, span.positions[drop]] = False
        else:
            keep[span.sample, span.positions[k:]] = False
    right_padded = (
        attention_mask is not None
        and bool((attention_mask[:, -1] == 0).any())
        and not bool((attention_mask[:, 0] == 0).any())
    )
    if left is None:
        left = not right_padded
    elif left and right_padded:
        keep &= attention_mask.bool()  # the caller's right padding moves to the left with the new padding
    lengths = keep.sum(dim=1)
    new_len = int(lengths.max())
    index = torch.full((bsz, new_len), -1, dtype=torch.long, device=input_ids.device)
    for b in range(bsz):
        pos = keep[b].nonzero().squeeze(-1)
        if left:
            index[b, new_len - pos.numel() :] = pos
        else:
            index[b, : pos.numel()] = pos
    return Compaction(index=index, left_padded=left)
