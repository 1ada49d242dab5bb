"""Reading device values on the host, deliberately and rarely.

On a GPU every host read (``.item()``, ``.tolist()``, ``int(t)``, a boolean test on a tensor, ``nonzero()``) waits
for the queue to drain, and a few milliseconds of stalls vanish in a CPU prefill but not in a 30 ms GPU one. A sieved
call therefore reads the device a fixed number of times, whatever the batch size: the prompt's layout once
(:class:`HostPrompt`), then each stage's results in one batched transfer (:func:`read_lists`). Everything the host
decides (placeholder spans, counts, gather indices) is computed from those reads in plain Python and sent back with
:func:`to_device`, which does not wait for the device queue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.base import read_lists  # noqa: F401 (the one batched read; methods use it too)


def to_device(values, device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` (nested lists of numbers) as a tensor on ``device``, copied without stalling a CUDA queue."""
    t = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class HostPrompt:
    """A prompt's ``input_ids`` and ``attention_mask`` as host lists: the one read of the prompt a call makes.

    ``mask`` is ``None`` when the caller passed none (every token real).
    """

    ids: list[list[int]]
    mask: list[list[int]] | None

    @classmethod
    def of(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> HostPrompt:
        if attention_mask is None or tuple(attention_mask.shape) != tuple(input_ids.shape):
            return cls(input_ids.tolist(), None)
        both = torch.stack([input_ids, attention_mask.to(device=input_ids.device, dtype=input_ids.dtype)]).tolist()
        return cls(both[0], both[1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ids), len(self.ids[0]) if self.ids else 0

    def real(self, b: int) -> list[bool]:
        """Which slots of sample ``b`` are real tokens (not padding)."""
        return [True] * len(self.ids[b]) if self.mask is None else [m != 0 for m in self.mask[b]]

    @property
    def right_padded(self) -> bool:
        """Padding only on the right (the last slot of some sample is padding, no first slot is)."""
        if self.mask is None:
            return False
        return any(row[-1] == 0 for row in self.mask) and not any(row[0] == 0 for row in self.mask)
