"""Qwen2-VL and Qwen2.5-VL: a CLS-free ViT on packed patch sequences, a 2x2 merger, an M-RoPE language model.

Choices, each forced by the architecture:

* **Candidates are merge units.** The merger concatenates 4 consecutive patches (one 2x2 block) into one LM token,
  so a token can only be kept or dropped as a whole unit. Pre-projector methods select on the merger's input units
  (the 4 patch vectors concatenated, [n, 4*d]); kept and created units (pool, VisionZip merges) are averaged in
  that space and then projected by the model's own merger, as LLaVA's methods merge before its projector.
  Post-projector methods (DivPrune) select on the merger's output. The selection itself lives in
  :mod:`tokensieve.engine.merge_units` (torch-only), so the vLLM integration runs the same code on vLLM's ViT.
* **Encoder signals are per patch, pooled per unit** (mean over the 4 patches): hidden states, keys, attention.
  For attention-based scores (FasterVLM, VisionZip) this equals pooling the patch scores. EvoCut scores the
  movement of a unit's mean hidden state.
* **No CLS token.** Where a method asks for CLS attention this adapter gives the documented CLS-free fallback:
  the mean attention each patch *receives* from all queries of its attention segment (an image, or one temporal
  patch of a video: the ViT's full-attention blocks attend within these), head by head, from that block's q/k
  with the vision RoPE applied. Keys for VisionZip are taken before RoPE so similarity is by content, not place.
  VisionZip has no CLS hidden state to keep, so all its dominant slots go to patches.
* **Qwen2.5-VL window order is undone** (the ViT runs its blocks on a window-permuted sequence) before any signal
  is read, so candidates are always in the processor's raster order of merge units.
* **Positions are preserved.** M-RoPE ids encode (t, h, w), so the 3-D positions are computed on the full prompt
  and gathered for the kept tokens; row 0 (text positions, only used for masks) is contiguous over the kept
  sequence. ``image_grid_thw`` is never passed with the shrunk ids. Generation then continues from the last
  kept position + 1, which equals the uncompressed prompt's continuation.
  In-LLM methods gather the already computed M-RoPE cos/sin to their kept slots, so the same holds there.
* **Budgets.** Scope ``image`` (default) and ``frame``: k per image and k per video frame (temporal patch).
  ``global``: k for each image or each whole video, ranked over all its frames together.
"""

from __future__ import annotations

from typing import Any

import torch

from ..budget import Budget, Scope
from ..engine.capture import capture_encoder, packed_segments
from ..engine.encoder_stage import check_unit_cut, cut_units, follow_cut, unit_state
from ..engine.merge_units import UnitSignals, rotate, select_units
from ..errors import NonFiniteFeaturesError, PlaceholderError
from ..methods.base import IN_ENCODER, IN_LLM, POST_PROJECTOR, PRE_PROJECTOR, Method, Request
from ..methods.encoder import EncoderCut, EncoderMethod
from ..report import ImageReport, MergeGroups
from .base import Adapter, Encoded, now

_FULL_POSITIONS = "tokensieve_full_positions"
"""Where ``prepare`` leaves the full prompt's M-RoPE positions [3, B, L] for ``carry_inputs`` to gather."""


class QwenVLAdapter(Adapter):
    family = "qwen2-vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    model_types = ("qwen2_vl", "qwen2_5_vl")
    display_names = ("Qwen2-VL", "Qwen2.5-VL")
    scopes = (Scope.IMAGE, Scope.FRAME, Scope.GLOBAL)
    stages = (PRE_PROJECTOR, POST_PROJECTOR, IN_ENCODER, IN_LLM)
    signal_kinds = Adapter.signal_kinds + ("attention_received",)
    encoder_inputs = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    visual_inputs = ("pixel_values", "pixel_values_videos")

    def __init__(self, model) -> None:
        super().__init__(model)
        self.base = model.model
        self.visual = self.base.visual
        self.blocks = self.visual.blocks
        self.merger = self.visual.merger
        self.merge = int(self.visual.spatial_merge_size)
        self.unit = self.merge**2
        self.windowed = hasattr(self.visual, "fullatt_block_indexes")

    # -- model facts -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @classmethod
    def encoder_layers_of(cls, config) -> int:
        return int(config.vision_config.depth)

    def vision_modules(self) -> tuple:
        return self.visual, self.merger.mlp  # pre-projector methods re-run the merger's MLP on the kept units

    def meter_parts(self) -> tuple:
        return self.blocks, [self.merger.mlp], None, packed_segments

    def _counts(self, grid) -> list[int]:
        return [] if grid is None else (grid.prod(-1) // self.unit).tolist()

    def tokens_per_image(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        return self._counts(encoder_kwargs.get("image_grid_thw"))

    def tokens_per_video(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        return self._counts(encoder_kwargs.get("video_grid_thw"))

    # -- positions ---------------------------------------------------------------------------------------------
    def prepare(self, kwargs, method, budget, method_name, left_pad=False):
        ids = kwargs.get("input_ids")
        if self.is_visual(kwargs) and ids is not None:
            if kwargs.get("position_ids") is not None:
                raise PlaceholderError(
                    "do not pass position_ids to a sieved Qwen-VL call: tokensieve computes the M-RoPE positions of "
                    "the full prompt and keeps those of the kept tokens"
                )
            mask = kwargs.get("attention_mask")
            mm = kwargs.get("mm_token_type_ids")
            if mm is None:  # what the processor would have produced
                mm = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
            if mask is not None and mask.dim() == 2:
                mask = mask.bool()
            elif mask is not None:
                mask = None  # base.prepare rejects it with a clear message
            # handed to carry_inputs inside this call's own kwargs (popped there), never kept on the adapter
            kwargs[_FULL_POSITIONS], _ = self.base.get_rope_index(
                ids,
                mm_token_type_ids=mm,
                image_grid_thw=kwargs.get("image_grid_thw"),
                video_grid_thw=kwargs.get("video_grid_thw"),
                attention_mask=mask,
            )
        return super().prepare(kwargs, method, budget, method_name, left_pad)

    def carry_inputs(self, kwargs, comp, input_ids) -> None:
        full = kwargs.pop(_FULL_POSITIONS)
        super().carry_inputs(kwargs, comp, input_ids)
        pos3 = comp.apply(full.permute(1, 2, 0), 0).permute(2, 0, 1)  # [3, B, L']
        mask = kwargs["attention_mask"]
        # row 0 only builds masks and must look like ordinary contiguous positions (see module docstring)
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        kwargs["position_ids"] = torch.cat([text.unsqueeze(0).to(pos3), pos3], dim=0)

    # -- encode + select ---------------------------------------------------------------------------------------
    def _unwindow(self, grid) -> torch.Tensor | None:
        """Row r of the ViT's (window-ordered) sequence holds patch ``order[r]``; None when there is no window order."""
        if not self.windowed:
            return None
        from transformers.vision_utils import get_vision_window_index

        cfg = self.visual.config
        window_index, _ = get_vision_window_index(grid, self.merge, cfg.window_size, cfg.patch_size)
        window_index = window_index.to(grid.device)
        return (window_index[:, None] * self.unit + torch.arange(self.unit, device=grid.device)).flatten()

    def _run(self, pixel, grid, request: Request, attn_layers: list[int], video: bool):
        """One vision forward with capture; returns merged output and per-patch signals in raster order."""
        captured_attn: dict[int, tuple] = {}
        state: dict[str, torch.Tensor] = {}
        handles = []

        for layer in attn_layers:

            def pre(mod, args, kw, _l=layer):
                hs = args[0] if args else kw["hidden_states"]
                captured_attn[_l] = (hs, kw["position_embeddings"])

            handles.append(self.blocks[layer].attn.register_forward_pre_hook(pre, with_kwargs=True))

        def merger_pre(mod, args):
            state["units_in"] = args[0]

        handles.append(self.merger.register_forward_pre_hook(merger_pre))
        try:
            with capture_encoder(self.blocks, Request(hidden_states=request.hidden_states), None) as cap:
                fn = self.base.get_video_features if video else self.base.get_image_features
                out = fn(pixel, grid, return_dict=True)
        finally:
            for h in handles:
                h.remove()
        order = self._unwindow(grid)

        def raster(x):
            if order is None:
                return x
            y = torch.empty_like(x)
            y[order] = x
            return y

        merged = torch.cat(list(out.pooler_output), dim=0)
        hidden = {i: raster(t) for i, t in cap.hidden_states.items()}
        qk = {}
        for layer, (hs, (cos, sin)) in captured_attn.items():
            attn = self.blocks[layer].attn
            p = hs.shape[0]
            q, k, _ = attn.qkv(hs).view(p, 3, attn.num_heads, -1).unbind(1)  # [P, H, hd]
            qk[layer] = (
                raster(rotate(q.float(), cos.float(), sin.float())),
                raster(rotate(k.float(), cos.float(), sin.float())),
                raster(k),
                float(attn.scaling),
            )
        return UnitSignals(raster(state["units_in"]), merged, hidden, qk)

    def _project(self, units: torch.Tensor) -> torch.Tensor:
        """The merger applied to already-gathered units [n, 4*d] (ln per patch, then the MLP)."""
        d = units.shape[-1] // self.unit
        return self.merger.mlp(self.merger.ln_q(units.reshape(-1, d)).view(-1, d * self.unit))

    @staticmethod
    def _visual_batches(encoder_kwargs: dict[str, Any]):
        """``(video, pixel key, pixels, grid)`` for the images, then the videos, of one call."""
        for video, pv_key, grid_key in (
            (False, "pixel_values", "image_grid_thw"),
            (True, "pixel_values_videos", "video_grid_thw"),
        ):
            pixel, grid = encoder_kwargs.get(pv_key), encoder_kwargs.get(grid_key)
            if pixel is None:
                continue
            if grid is None:
                raise PlaceholderError(f"{pv_key} was given without {grid_key}; pass the processor's output whole")
            yield video, pv_key, pixel, grid

    def encode(self, method: Method, budget: Budget, encoder_kwargs: dict[str, Any], spans=None) -> Encoded:
        if method.stage == IN_ENCODER:
            return self._encode_in_encoder(method, budget, encoder_kwargs)
        start = now()
        fl = self.num_layers  # the merger consumes the last block's output
        request = method.request(self.num_layers, fl)
        attn_layers = sorted(set(request.cls_attention) | set(request.keys) | set(request.attention_received))
        for idx in attn_layers:
            if not 0 <= idx < self.num_layers:
                raise ValueError(f"encoder layer {idx} outside 0..{self.num_layers - 1}")
        features: list[torch.Tensor] = []
        slots: list[list[int]] = []
        images: list[ImageReport] = []
        selection_s = 0.0
        patches_total = 0
        num_images = 0
        for video, pv_key, pixel, grid in self._visual_batches(encoder_kwargs):
            sig = self._run(pixel, grid, request, attn_layers, video)
            if not bool(torch.isfinite(sig.merged).all()):
                raise NonFiniteFeaturesError(
                    f"vision features of the {'videos' if video else 'images'} contain NaN or Inf; check "
                    f"{pv_key} and the model dtype"
                )
            patch_off = 0
            for t, h, w in grid.tolist():
                hu, wu = h // self.merge, w // self.merge
                frames = t if (video and budget.scope != Scope.GLOBAL) else 1
                what = "each video frame" if frames > 1 else ("each video" if video else "each image")
                k = budget.resolve(t * hu * wu // frames, what=what)
                t0 = now()
                feats, kept, merged_n, groups = select_units(
                    method,
                    k,
                    request,
                    sig,
                    thw=(t, h, w),
                    patch_offset=patch_off,
                    merge=self.merge,
                    frames=frames,
                    num_layers=self.num_layers,
                    project=self._project,
                )
                secs = now() - t0
                selection_s += secs
                patch_off += t * h * w
                patches_total += t * h * w
                features.append(feats)
                slots.append(kept.tolist())
                images.append(
                    ImageReport(
                        sample=-1,
                        image=len(images),
                        tokens_in=t * hu * wu,
                        tokens_out=int(feats.shape[0]),
                        kept_indices=list(slots[-1]),
                        grid=(t * hu, wu),
                        merged=merged_n,
                        selection_s=secs,
                        frames=t if video else 0,
                        groups=groups,
                    )
                )
            if not video:
                num_images = len(features)
        trace = [round(patches_total / max(1, len(images)))] * self.num_layers
        return Encoded(
            features,
            images,
            encode_s=now() - start,
            selection_s=selection_s,
            encoder_layer_tokens=trace,
            slots=slots,
            num_images=num_images,
        )

    # -- in-encoder ----------------------------------------------------------------------------------------------
    def _encode_in_encoder(self, method: EncoderMethod, budget: Budget, encoder_kwargs: dict[str, Any]) -> Encoded:
        """Cut inside the ViT by whole 2x2 merge units, so the merger still concatenates one unit per token.

        Each image (each video frame, or each whole video with scope ``global``) is one candidate set; the method
        sees it at unit level with the stage's virtual CLS (mean hidden / key / value, the mean query's attention),
        and a cut keeps or merges the 4 patch rows of a unit together. Later blocks get ``cu_seqlens`` and the
        vision rotary cut to the kept rows; kept tokens keep their M-RoPE ids in the LM, as for the other stages.
        """
        start = now()
        features: list[torch.Tensor] = []
        slots: list[list[int]] = []
        images: list[ImageReport] = []
        selection_s, num_images, traces = 0.0, 0, []
        for video, pv_key, pixel, grid in self._visual_batches(encoder_kwargs):
            cutter = _UnitCutter(self, method, budget, grid, video)
            merged = cutter.run(pixel)
            if not bool(torch.isfinite(merged).all()):
                raise NonFiniteFeaturesError(
                    f"vision features of the {'videos' if video else 'images'} contain NaN or Inf; check "
                    f"{pv_key} and the model dtype"
                )
            selection_s += cutter.selection_s
            traces.append(cutter.trace)
            base = 0  # first unit of the item in the raster-ordered merger output (dropped units are zeros there)
            for item, (t, h, w) in enumerate(grid.tolist()):
                mine = [c for c in cutter.sets if c.item == item]
                kept = torch.cat([c.offset + c.units.sort().values for c in mine])
                groups = MergeGroups(t * (h // self.merge) * (w // self.merge))
                for c in mine:
                    n_set = len(c.owner)
                    groups.add(
                        c.offset + torch.arange(n_set), c.units.sort().values, c.owner if c.merged else None, n_set
                    )
                feats = merged[(base + kept).to(merged.device)]
                hu, wu = h // self.merge, w // self.merge
                base += t * hu * wu
                features.append(feats)
                slots.append(kept.tolist())
                images.append(
                    ImageReport(
                        sample=-1,
                        image=len(images),
                        tokens_in=t * hu * wu,
                        tokens_out=int(feats.shape[0]),
                        kept_indices=list(slots[-1]),
                        grid=(t * hu, wu),
                        merged=sum(int((c.sizes > 1).sum()) for c in mine),
                        selection_s=cutter.selection_s / len(grid),
                        frames=t if video else 0,
                        groups=groups.result(),
                    )
                )
            if not video:
                num_images = len(features)
        per_item = [[n / len(images) for n in tr] for tr in traces]
        trace = [round(sum(tr[i] for tr in per_item)) for i in range(self.num_layers)]
        return Encoded(
            features,
            images,
            encode_s=now() - start,
            selection_s=selection_s,
            encoder_layer_tokens=trace,
            slots=slots,
            num_images=num_images,
        )


class _UnitSet:
    """One candidate set of the in-encoder cut: its current units in sequence order (set-local raster ids), where
    each sat in the ViT's sequence, their sizes and the method's memory."""

    def __init__(
        self, item: int, offset: int, grid: tuple[int, int], target: int, slots: torch.Tensor, segments: torch.Tensor
    ):
        self.item, self.offset, self.grid, self.target = item, offset, grid, target
        self.slot = slots  # [n] sequence slot (unit index in the ViT's order) of each set-local unit
        self.segment = segments  # [n] attention segment (image, or video frame) of each unit
        self.units = slots.argsort()  # units in sequence order: raster on Qwen2-VL, window order on Qwen2.5-VL
        self.sizes = torch.ones(len(slots))
        self.memory: dict = {}
        self.owner = self.units.argsort()  # set-local unit -> its current row (in sequence order), -1 dropped
        self.merged = False


class _UnitCutter:
    """Hooks on the Qwen-VL ViT blocks that cut whole merge units, for one ``visual`` forward (removed after).

    The ViT's sequence is raster order of units on Qwen2-VL and window order on Qwen2.5-VL; a set's rows are
    contiguous either way. Blocks after a cut get the rotary gathered to the kept rows and ``cu_seqlens`` rebuilt
    from the kept units per attention segment (full-attention blocks) or per window (Qwen2.5-VL's other blocks);
    the merger's output is scattered back to full length so that Qwen2.5-VL's own un-windowing still applies.
    """

    def __init__(self, adapter: QwenVLAdapter, method: EncoderMethod, budget: Budget, grid: torch.Tensor, video: bool):
        self.a, self.method, self.grid = adapter, method, grid
        self.plan = method.plan(adapter.num_layers, adapter.num_layers)
        self.sets: list[_UnitSet] = []
        total = int((grid.prod(-1) // adapter.unit).sum())
        self.window = None
        if adapter.windowed:
            from transformers.vision_utils import get_vision_window_index

            cfg = adapter.visual.config
            index, cu = get_vision_window_index(grid, adapter.merge, cfg.window_size, cfg.patch_size)
            slot_of_raster = torch.empty(total, dtype=torch.long)
            slot_of_raster[index.long().cpu()] = torch.arange(total)
            cu_units = torch.as_tensor(cu).long().cpu() // adapter.unit
            self.window = torch.searchsorted(cu_units[1:], torch.arange(total), right=True)  # per slot
        else:
            slot_of_raster = torch.arange(total)
        unit0 = seg = 0
        for item, (t, h, w) in enumerate(grid.tolist()):
            hu, wu = h // adapter.merge, w // adapter.merge
            per_frame = hu * wu
            frames = t if (video and budget.scope != Scope.GLOBAL) else 1
            n = t * per_frame // frames
            what = "each video frame" if frames > 1 else ("each video" if video else "each image")
            k = budget.resolve(n, what=what)
            for f in range(frames):
                ids = torch.arange(f * n, (f + 1) * n)  # item-level raster ids of this set's units
                self.sets.append(
                    _UnitSet(item, f * n, (n // wu, wu), k, slot_of_raster[unit0 + ids], seg + ids // per_frame)
                )
            unit0 += t * per_frame
            seg += t
        self.total = total
        self.planned = set(self.plan.layers) if any(s.target < len(s.units) for s in self.sets) else set()
        self.selection_s = 0.0
        self.trace = [0] * adapter.num_layers

    def _slots(self) -> torch.Tensor:
        """Sequence slot of every current unit, in the current sequence order."""
        return torch.cat([s.slot[s.units] for s in self.sets])

    def _cu(self, group: torch.Tensor, count: int, device) -> tuple[torch.Tensor, int]:
        """``cu_seqlens`` of the kept rows per attention group; groups left empty are skipped (SDPA's split of the
        sequence cannot take an empty chunk)."""
        lengths = torch.bincount(group, minlength=count) * self.a.unit
        lengths = lengths[lengths > 0]
        return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32), int(
            lengths.max()
        )

    def run(self, pixel: torch.Tensor) -> torch.Tensor:
        """The merger's output for every unit in raster order; units the cuts dropped are zeros."""
        a, u = self.a, self.a.unit
        st: dict[str, Any] = {"cut": False}
        handles = []
        full_blocks = set(getattr(a.visual, "fullatt_block_indexes", range(a.num_layers)))
        segments = torch.cat([s.segment[s.slot.argsort()] for s in self.sets])  # per slot, sets are contiguous

        def block_pre(mod, args, kwargs, _i):
            hs = args[0] if args else kwargs["hidden_states"]
            self.trace[_i] = int(hs.shape[0])
            if _i == 0:
                st["pe"] = kwargs["position_embeddings"]
            if not st["cut"]:
                return None
            kwargs = dict(kwargs)
            slots = st["slots"]
            rows = (slots[:, None] * u + torch.arange(u)).flatten().to(hs.device)
            cos, sin = st["pe"]
            kwargs["position_embeddings"] = (cos[rows], sin[rows])
            if _i in full_blocks or self.window is None:
                cu, longest = self._cu(segments[slots], int(self.grid[:, 0].sum()), hs.device)
            else:
                cu, longest = self._cu(self.window[slots], int(self.window.max()) + 1, hs.device)
            kwargs["cu_seqlens"] = cu
            if "max_seqlen" in kwargs:
                kwargs["max_seqlen"] = longest
            return args, kwargs

        def attn_pre(mod, args, kwargs, _i):
            st[("attn", _i)] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

        def block_post(mod, args, output, _i):
            t0 = now()
            new = self._cut(_i, output, *st.pop(("attn", _i)))
            self.selection_s += now() - t0
            st["cut"], st["slots"] = True, self._slots()
            return new

        def merger_post(mod, args, output):
            if not st["cut"]:
                return None
            full = output.new_zeros(self.total, output.shape[-1])
            full[st["slots"].to(output.device)] = output
            return full

        try:
            for i, blk in enumerate(a.blocks):
                handles.append(
                    blk.register_forward_pre_hook(lambda m, x, k, _i=i: block_pre(m, x, k, _i), with_kwargs=True)
                )
            for i in self.planned:
                handles.append(
                    a.blocks[i].attn.register_forward_pre_hook(
                        lambda m, x, k, _i=i: attn_pre(m, x, k, _i), with_kwargs=True
                    )
                )
                handles.append(a.blocks[i].register_forward_hook(lambda m, x, o, _i=i: block_post(m, x, o, _i)))
            handles.append(a.merger.register_forward_hook(merger_post))
            out = a.visual(pixel, grid_thw=self.grid)
        finally:
            for h in handles:
                h.remove()
        return out.pooler_output

    def _cut(self, layer: int, hs: torch.Tensor, normed: torch.Tensor, pe) -> torch.Tensor:
        a, u = self.a, self.a.unit
        attn = a.blocks[layer].attn
        r = hs.shape[0]
        signals = self.plan.cls_attention or self.plan.keys or self.plan.values
        if signals:  # this block's own q/k/v, recomputed only when the method reads them
            q, k, v = attn.qkv(normed).view(r, 3, attn.num_heads, -1).unbind(1)  # [R, H, hd]
            cos, sin = pe
            qr = rotate(q.float(), cos.float(), sin.float())
            kr = rotate(k.float(), cos.float(), sin.float())
        last = layer == max(self.planned)
        pieces, start = [], 0
        for s in self.sets:
            n = len(s.units)
            sl = slice(start, start + n * u)
            start += n * u
            rows = hs[sl]
            if n == s.target:
                pieces.append(rows)
                continue
            unit_mean = lambda x: x.reshape(n, u, *x.shape[1:]).float().mean(1)  # noqa: E731, B023 (used within this iteration)
            if signals:
                # the mean query of the set over its patch keys; a unit's share is the sum over its 4 patches
                gq = qr[sl].mean(0)  # [H, hd]
                probs = (torch.einsum("hd,phd->hp", gq, kr[sl]) * float(attn.scaling)).softmax(-1)  # [H, n*u]
                att, keys, values = (
                    probs.view(-1, n, u).sum(-1),
                    unit_mean(k[sl]).transpose(0, 1),
                    unit_mean(v[sl]).transpose(0, 1),
                )  # keys before RoPE: content
            else:
                att, keys, values = torch.zeros(1, n), torch.zeros(1, n, 1), torch.zeros(1, n, 1)
            state = unit_state(
                self.plan,
                layer,
                a.num_layers,
                s.grid,
                unit_mean(rows),
                att,
                keys,
                values,
                s.sizes,
                s.units,
                s.target,
                s.memory,
            )
            cut: EncoderCut | None = self.method.cut(state)
            if cut is None:
                if last:
                    raise ValueError(f"{self.method.name} made no cut at its last layer {layer}; target {s.target}")
                pieces.append(rows)
                continue
            check_unit_cut(cut, n, s.target, last, layer, self.method.name)
            s.owner = follow_cut(s.owner[None], cut.keep[:1], None if cut.groups is None else cut.groups[:1], n)[0]
            s.merged = s.merged or cut.groups is not None
            kept = cut.keep[0, 1:] - 1
            new_rows, s.sizes = cut_units(rows.reshape(n, u, -1), s.sizes, cut, self.method.name)
            s.units = s.units[kept.cpu()]
            pieces.append(new_rows.reshape(-1, rows.shape[-1]))
        return torch.cat(pieces)
