"""What a sieved call did: per image token counts, kept grid indices and time spent selecting."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class MergeGroups:
    """Builds ``ImageReport.groups`` of an entry made of several candidate sets (crops, frames, a whole grid).

    Per grid cell of the entry's report grid: an id of the output token the cell went into (cells with one id went
    into one token; ids are unique within the entry), -1 if dropped. ``None`` when no set merged, so methods that
    only keep or drop report no groups.
    """

    def __init__(self, cells: int) -> None:
        self.ids = torch.full((cells,), -1, dtype=torch.long)
        self.offset = 0
        self.merged = False

    def add(self, cells: torch.Tensor, kept: torch.Tensor | None, groups: torch.Tensor | None, count: int) -> None:
        """One set: ``cells`` [n] the grid cell of each candidate; ``groups`` [n] the set's output token of each
        candidate (a method's ``Selection.groups`` row, -1 dropped) or ``None``, then ``kept`` [k] candidates stay
        as themselves; ``count`` ids are reserved for the set's outputs."""
        cells = cells.cpu().long()
        if groups is not None:
            g = groups.cpu().long()
            hit = g >= 0
            self.ids[cells[hit]] = self.offset + g[hit]
            self.merged = True
        elif kept is not None:
            kept = kept.cpu().long()
            self.ids[cells[kept]] = self.offset + torch.arange(kept.numel())
        self.offset += int(count)

    def result(self) -> list[int] | None:
        return self.ids.tolist() if self.merged else None


@dataclass
class ImageReport:
    """One image of one call.

    ``kept_indices`` index the encoder's patch grid in raster order (row * cols + col), CLS excluded; for methods
    that create tokens (merging, pooling) they are the positions the created tokens stand for, and ``merged`` says
    how many of ``tokens_out`` are such created tokens; ``groups`` says which patches each created token merges.
    ``selection_s`` is this image's share of the batched selection time.
    """

    sample: int
    image: int
    tokens_in: int
    tokens_out: int
    kept_indices: list[int]
    grid: tuple[int, int]
    merged: int
    selection_s: float
    groups: list[int] | None = None
    """For methods that merge: per grid patch (raster, CLS excluded), the output token it went into, -1 if
    dropped; ``None`` for methods that only keep or drop."""
    crops: int = 1
    """Crops this entry spans (anyres base view + grid); 1 for single-grid images and for videos."""
    frames: int = 0
    """Video frames (Qwen-VL: temporal patches) this entry spans; 0 for an image."""
    llm_layer_tokens: list[int] = field(default_factory=list)
    """This image's visual tokens per decoder layer in prefill (filled when an in-LLM stage ran)."""
    crop_of: int | None = None
    """Families that report each crop as its own entry (Idefics3): the prompt's image this crop belongs to, so
    per-image budgets (in-LLM ones too) can add its crops up."""

    @property
    def llm_tokens_avg(self) -> float:
        """Layer-averaged visual tokens of this image: the budget semantics of in-LLM methods."""
        if not self.llm_layer_tokens:
            return float(self.tokens_out)
        return sum(self.llm_layer_tokens) / len(self.llm_layer_tokens)

    def to_dict(self) -> dict:
        out = dict(vars(self), llm_tokens_avg=self.llm_tokens_avg)
        if self.crop_of is None:
            del out["crop_of"]
        return out


@dataclass
class SieveReport:
    """One call of ``generate()`` or ``forward()`` under a sieve."""

    method: str
    budget: str
    scope: str
    stage: str
    images: list[ImageReport] = field(default_factory=list)
    encode_s: float = 0.0
    """Vision encoder + projector time, selection included."""
    selection_s: float = 0.0
    seq_len_in: int = 0
    seq_len_out: int = 0
    kept_positions: list[torch.Tensor] = field(default_factory=list)
    """Per sample, the positions of the original sequence that the LM saw, in order (padding included)."""
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    """The compressed batch the LM received: forward() logits are aligned with these, not with the original."""
    visual_index: torch.Tensor | None = None
    """[B, L'] aligned with ``input_ids``: which of its sample's entries in ``images`` (0, 1, ... in report order,
    images before videos) each visual slot belongs to, -1 for text and padding. Image and video placeholders may
    interleave in the prompt, so the in-LLM stage reads ownership from here rather than from token ids."""
    encoder_layer_tokens: list[int] = field(default_factory=list)
    """Per vision-encoder layer (layer 0 first), the sequence length one image had entering it, CLS included
    (the mean over the call's encoder passes); in-encoder methods make it shrink with depth."""
    encoder_layer_segments: list[list[int]] = field(default_factory=list)
    """Per vision-encoder layer, the length of every attention segment it ran on in this call (one per image, crop
    or video frame; Qwen-VL: per temporal patch or window), counted while the call ran: the trace FLOPs are priced
    from (empty for a layer that did not run)."""
    projected_tokens: int | None = None
    """Rows the projector (Qwen-VL: the merger's MLP; Idefics3: the connector's projection) ran on in this call."""
    encoder_head_tokens: list[int] = field(default_factory=list)
    """Rows entering a SigLIP attention-pooling head, one entry per encoder pass that ran it."""
    llm_layer_tokens: list[list[int]] = field(default_factory=list)
    """Per sample, per decoder layer (layer 0 first), the real (unpadded) tokens that layer processed in prefill."""
    llm_layer_visual_tokens: list[list[int]] = field(default_factory=list)
    """Per sample, per decoder layer, how many of those tokens were visual; in-LLM methods make it shrink."""
    llm_budget: str = ""
    """The in-LLM stage's budget (layer-averaged visual tokens per image), empty without one."""
    llm_kept_positions: list[torch.Tensor] = field(default_factory=list)
    """With an in-LLM stage: per sample, the positions of ``input_ids`` behind the last decoder layer's slots
    (-1 for alignment slots). ``forward()`` logits are aligned with these."""
    visual_input: bool = True
    """False for a call without images or videos: it ran uncompressed, and the report says so (it never keeps
    the numbers of an earlier call)."""
    host_visual_index: list[list[int]] | None = field(default=None, repr=False)
    host_attention_mask: list[list[int]] | None = field(default=None, repr=False)
    """``visual_index`` and ``attention_mask`` as the host already knows them (the in-LLM stage plans from these
    without reading the device)."""

    @property
    def llm_visual_tokens_avg(self) -> list[float]:
        """Per sample, visual tokens averaged over decoder layers (equal to those entering the LM without an in-LLM
        stage)."""
        return [sum(t) / len(t) if t else 0.0 for t in self.llm_layer_visual_tokens]

    @property
    def tokens_in(self) -> int:
        return sum(im.tokens_in for im in self.images)

    @property
    def tokens_out(self) -> int:
        return sum(im.tokens_out for im in self.images)

    def summary(self) -> str:
        if not self.visual_input:
            return (
                f"{self.method} (budget {self.budget} per {self.scope}): no visual input in this call (text only), "
                f"nothing compressed; sequence {self.seq_len_in}"
            )
        n = len(self.images)
        ratio = self.tokens_out / self.tokens_in if self.tokens_in else 1.0
        return (
            f"{self.method} (budget {self.budget} per {self.scope}): {n} image(s), visual tokens "
            f"{self.tokens_in} -> {self.tokens_out} ({ratio:.1%}), sequence {self.seq_len_in} -> {self.seq_len_out}, "
            f"encode {self.encode_s * 1e3:.1f} ms of which selection {self.selection_s * 1e3:.2f} ms"
            + (
                f"; in the LM (budget {self.llm_budget}): layer-averaged visual tokens "
                + ", ".join(f"{a:.1f}" for a in self.llm_visual_tokens_avg)
                if self.llm_budget
                else ""
            )
        )

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "scope": self.scope,
            "stage": self.stage,
            "visual_input": self.visual_input,
            "encode_s": self.encode_s,
            "selection_s": self.selection_s,
            "seq_len_in": self.seq_len_in,
            "seq_len_out": self.seq_len_out,
            "encoder_layer_tokens": list(self.encoder_layer_tokens),
            "encoder_layer_segments": [list(s) for s in self.encoder_layer_segments],
            "projected_tokens": self.projected_tokens,
            "encoder_head_tokens": list(self.encoder_head_tokens),
            "llm_layer_tokens": [list(t) for t in self.llm_layer_tokens],
            "llm_layer_visual_tokens": [list(t) for t in self.llm_layer_visual_tokens],
            "llm_budget": self.llm_budget,
            "llm_visual_tokens_avg": self.llm_visual_tokens_avg,
            "images": [im.to_dict() for im in self.images],
        }
