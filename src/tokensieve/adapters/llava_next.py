"""LLaVA-NeXT anyres: a base view plus a grid of crops, unpadded, with an ``image_newline`` token after each row.

Choices:

* **Where the packed tokens come from is read off the model itself**: the model's own ``pack_image_features`` is run
  on crop-patch *ids* instead of features, so the unpadding and newline layout of any checkpoint, pinpoint list or
  image size is followed exactly, with no copy of the layout arithmetic here. Layout, budgets per crop, selection
  and packing live in :mod:`tokensieve.engine.anyres` (torch-only), shared with the vLLM integration.
* **Candidates of a crop are its patches that survive unpadding** (a rectangle of the crop's grid, so grid-based
  methods such as pool still see a grid); the base view keeps all its patches. Signals (CLS attention, keys, hidden
  states) are the crop's own, from CLIP run on that crop.
* **Budgets.** ``crop``: k per crop (the base view is a crop). ``image`` (default): k for the whole image, split
  equally over its crops (the literature's 640/320/160 of 2880 are 128/64/32 per crop of a 5-crop image); a ratio is
  the same ratio in every crop. ``global``: k for the whole image, ranked across all its crops together. A crop that
  unpadding left with fewer patches than its share keeps all of them.
* **Newline policy.** By default the newline that ends a grid row is kept when that row keeps at least one token and
  dropped otherwise, so the LM still sees row breaks where rows remain and keep-all equals the uncompressed model.
  ``Sieve(..., newlines="all")`` keeps every newline (FasterVLM's official code), ``"none"`` drops them all
  (FlowCut's); both fix an image's count before selection (see ``tokensieve.engine.anyres``). Newlines are
  structural and do not count towards the budget (``tokens_out`` counts them, ``kept_indices`` does not).
  That rule is about what enters the LM. In-LLM methods see the packed sequence the LM sees, where newlines sit on
  image placeholders: there they are visual tokens, scored and dropped like any other.
* **Placement.** Kept tokens stay where they were in the packed order (base view first, then grid rows). A created
  token goes where its anchor is (pool's window centre, VisionZip's merge target); one without a grid position
  (VisionZip's CLS token) follows the image's grid. Positions are re-indexed (contiguous), as for LLaVA-1.5.
"""

from __future__ import annotations

from typing import Any

import torch

from ..budget import Budget, Scope
from ..engine import anyres
from ..engine.anyres import Packed as _Packed
from ..engine.capture import capture_encoder
from ..engine.encoder_stage import run_encoder_stage
from ..errors import BudgetError, NonFiniteFeaturesError, UnsupportedModelError
from ..methods.base import IN_ENCODER, IN_LLM, POST_PROJECTOR, PRE_PROJECTOR, Layout, Method
from ..methods.encoder import EncoderMethod
from ..report import ImageReport, MergeGroups
from .base import Adapter, Encoded, now
from .towers import ClipTower


class LlavaNextAdapter(ClipTower, Adapter):
    """LLaVA-1.5's tower facts (:class:`~tokensieve.adapters.towers.ClipTower`); the anyres layout is its own."""

    family = "llava-next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)
    display_names = ("LLaVA-NeXT",)
    newline_policies = anyres.NEWLINES
    scopes = (Scope.IMAGE, Scope.CROP, Scope.GLOBAL)
    stages = (PRE_PROJECTOR, POST_PROJECTOR, IN_ENCODER, IN_LLM)
    signal_kinds = Adapter.signal_kinds + ("attention_received",)

    cls_offset = 1
    """Encoder rows before the patches (the CLS token); the projector sees patches only."""
    newlines = "rows"
    """Which ``image_newline`` tokens follow selection (``tokensieve.engine.anyres``): set by
    ``Sieve(..., newlines=)``."""

    encoder_inputs = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    def __init__(self, model) -> None:
        super().__init__(model)
        self._init_tower(model)
        self.side = self.grid[0]
        self.per_crop = self.side * self.side

    def _strategy(self, enc: dict[str, Any]) -> str:
        strategy = super()._strategy(enc)
        if strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={strategy!r} is not supported on {self.family}: its packing assumes "
                "the CLS token is dropped ('default')"
            )
        return strategy

    @classmethod
    def prefix_of(cls, config) -> int:
        return 0  # the packing drops the CLS token ('default' strategy; other strategies are refused per call)

    @classmethod
    def limits_of(cls, config) -> dict[Scope, int]:
        vc = config.vision_config
        return {Scope.CROP: (vc.image_size // vc.patch_size) ** 2}  # an image's count depends on its size

    def _num_crops(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [
            int(image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size))
            for size in encoder_kwargs["image_sizes"]
        ]

    def _pack(self, ids: list[torch.Tensor], encoder_kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The model's own packing applied to [crops, patches, 1] id tensors."""
        newline = torch.tensor([-1.0], dtype=torch.float64)
        packed, _ = self.base.pack_image_features(ids, encoder_kwargs["image_sizes"], "default", newline)
        return list(packed)

    def _feature_kwargs(self, encoder_kwargs: dict[str, Any], strategy: str) -> dict[str, Any]:
        """Arguments of the model's own ``get_image_features`` for this call."""
        return dict(
            pixel_values=encoder_kwargs["pixel_values"],
            image_sizes=encoder_kwargs["image_sizes"],
            vision_feature_layer=self._feature_layer(encoder_kwargs),
            vision_feature_select_strategy=strategy,
            return_dict=True,
        )

    def _attention(self, cap, layer: int) -> torch.Tensor:
        """[crops, H, T] attention scores over the encoder rows of each crop (here: the CLS query's row)."""
        return cap.attention_row(layer, 0)

    def _packed(self, encoder_kwargs: dict[str, Any]) -> list[_Packed]:
        counts = self._num_crops(encoder_kwargs)
        packed = self._pack([anyres.crop_ids(n, self.per_crop) for n in counts], encoder_kwargs)
        return [anyres.layout(flat, n, self.per_crop) for flat, n in zip(packed, counts)]

    def tokens_per_image(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        return [int(p.crop.numel()) for p in self._packed(encoder_kwargs)]

    # -- encode + select ---------------------------------------------------------------------------------------
    def _shares(self, budget: Budget, sizes: list[int]) -> list[int]:
        return anyres.shares(budget, sizes, self.per_crop)

    def encode(self, method: Method, budget: Budget, encoder_kwargs: dict[str, Any], spans=None) -> Encoded:
        if method.stage == IN_ENCODER:
            return self._encode_in_encoder(method, budget, encoder_kwargs)
        start = now()
        strategy = self._strategy(encoder_kwargs)
        packs = self._packed(encoder_kwargs)
        feature_layers = self.feature_layers(encoder_kwargs)
        fl = feature_layers[-1]
        request = method.request(self.num_layers, fl)
        state: dict[str, torch.Tensor] = {}

        def grab(mod, args):
            state["pre"] = args[0]

        extra = tuple(feature_layers) if request.cls_hidden else ()
        with capture_encoder(self.layers, request, self._attention_parts, extra) as cap:
            hook = self.base.multi_modal_projector.register_forward_pre_hook(grab)
            try:
                out = self.base.get_image_features(**self._feature_kwargs(encoder_kwargs, strategy))
            finally:
                hook.remove()
            packed_feats = list(out.pooler_output)
            pre = state["pre"]  # [all crops, patches, d] in crop order
            if not bool(torch.isfinite(pre).all()):
                raise NonFiniteFeaturesError(
                    "vision features contain NaN or Inf; check pixel_values and the model dtype"
                )
            t_sel = 0.0
            features, images = [], []
            crop0 = 0
            for i, (pk, packed) in enumerate(zip(packs, packed_feats)):
                t0 = now()
                feats, kept, merged, groups = self._select_image(
                    method, budget, request, cap, feature_layers, pre, crop0, pk, packed
                )
                crop0 += pk.num_crops
                secs = now() - t0
                t_sel += secs
                features.append(feats)
                images.append(
                    ImageReport(
                        sample=-1,
                        image=i,
                        tokens_in=int(pk.crop.numel()),
                        tokens_out=int(feats.shape[0]),
                        kept_indices=kept,
                        grid=(pk.num_crops * self.side, self.side),
                        merged=merged,
                        selection_s=secs,
                        crops=pk.num_crops,
                        groups=groups,
                    )
                )
        trace = [self.per_crop + 1] * self.num_layers
        return Encoded(features, images, encode_s=now() - start, selection_s=t_sel, encoder_layer_tokens=trace)

    def _encode_in_encoder(self, method: EncoderMethod, budget: Budget, encoder_kwargs: dict[str, Any]) -> Encoded:
        """Cut inside CLIP, crop by crop, then place the survivors in the model's packed layout.

        Every crop (base view and grid crops, all images of the call) is one row of the tower's batch; crops that
        must keep the same count run together. A CLS-free tower (OneVision's SigLIP) gets the stage's virtual CLS
        (mean-query attention fallback). A crop's target is its share of the budget over the patches that
        survive unpadding, as before the projector, but the encoder sees the whole crop, so a kept patch that
        unpadding removes afterwards is dropped: such a crop keeps at most its share (exactly its share when the
        image fills its crops), as FlowCut's own LLaVA-NeXT code does. A crop whose share is all its surviving
        patches is not cut. Newlines follow the rows that keep a token, as for the other stages.
        """
        start = now()
        self._strategy(encoder_kwargs)
        if budget.scope == Scope.GLOBAL:
            raise BudgetError(
                f"{method.name} cuts inside the encoder, where each crop runs on its own: scope 'global' (ranking "
                "across crops) is not possible there; use 'image' or 'crop'"
            )
        packs = self._packed(encoder_kwargs)
        pv = encoder_kwargs["pixel_values"]
        crops_pv = torch.cat([pv[i, : pk.num_crops] for i, pk in enumerate(packs)]) if pv.dim() == 5 else pv
        targets: list[int] = []
        for pk in packs:
            sizes = [int(s[2].numel()) for s in self._candidate_sets(pk, budget.scope)]
            # a crop that keeps every surviving patch is not cut at all (keep-all equals the uncompressed model)
            targets += [self.per_crop if k == n else k for k, n in zip(self._shares(budget, sizes), sizes)]
        feature_layers = self.feature_layers(encoder_kwargs)
        plan = method.plan(self.num_layers, min(feature_layers))
        skip = bool(getattr(method, "skip_unused_layers", True))
        layout = Layout(self.grid, 1)  # inside the encoder CLS is row 0
        rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # crop -> (features, patch, size)
        traces, selection_s = [], 0.0
        for target in sorted(set(targets) - {0}):
            idx = [c for c, t in enumerate(targets) if t == target]
            res = run_encoder_stage(
                self.layers,
                self._attention_parts,
                method,
                plan,
                layout,
                target,
                feature_layer=min(feature_layers),
                record=feature_layers,
                run=lambda x: self.base.vision_tower(x, output_hidden_states=False, return_dict=True),
                pixel_values=crops_pv[idx],
                stop_after=max(feature_layers) if skip else None,
                cls_free=not self.cls_offset,
            )
            selection_s += res.selection_s
            traces += res.traces
            for j, c in enumerate(idx):
                feats = torch.cat([res.hidden[f][j][self.cls_offset :] for f in feature_layers], dim=-1)
                if not bool(torch.isfinite(feats).all()):
                    raise NonFiniteFeaturesError(
                        "vision features contain NaN or Inf; check pixel_values and the model dtype"
                    )
                rows[c] = (
                    self.base.multi_modal_projector(feats),
                    res.positions[j][1:],
                    res.sizes[j][1:],
                    res.groups[j],
                )
        newline = self.base.image_newline
        dtype = next(self.base.multi_modal_projector.parameters()).dtype
        features, images, crop0 = [], [], 0
        for i, pk in enumerate(packs):
            where = {(int(c), int(p)): q for q, (c, p) in enumerate(zip(pk.crop.tolist(), pk.patch.tolist())) if c >= 0}
            placed: dict[int, torch.Tensor] = {}
            kept_ids, merged = [], 0
            groups = MergeGroups(pk.num_crops * self.per_crop)
            for c in range(pk.num_crops):
                if crop0 + c not in rows:
                    continue
                feats, patch, size, owner = rows[crop0 + c]
                placed_rows = []
                for r, (p, n) in enumerate(zip(patch.tolist(), size.tolist())):
                    q = where.get((c, int(p)))
                    if q is None:
                        continue  # unpadding removes this patch
                    placed[q] = feats[r]
                    placed_rows.append(r)
                    kept_ids.append(c * self.per_crop + int(p))
                    merged += int(n > 1)
                if owner is not None:  # a row that unpadding removed took its merged patches with it
                    live = torch.isin(owner, torch.tensor(placed_rows, dtype=owner.dtype))
                    groups.add(
                        c * self.per_crop + torch.arange(self.per_crop),
                        None,
                        torch.where(live, owner, -1),
                        self.per_crop,
                    )
                else:
                    cells = c * self.per_crop + patch[torch.tensor(placed_rows, dtype=torch.long)].long().cpu()
                    groups.add(cells, torch.arange(len(placed_rows)), None, self.per_crop)
            crop0 += pk.num_crops
            out = (
                anyres.assemble(pk, placed, [], lambda q: newline.to(dtype), self.newlines)
                if placed
                else torch.zeros(0, newline.shape[-1], dtype=dtype, device=newline.device)
            )
            features.append(out)
            images.append(
                ImageReport(
                    sample=-1,
                    image=i,
                    tokens_in=int(pk.crop.numel()),
                    tokens_out=int(out.shape[0]),
                    kept_indices=sorted(kept_ids),
                    grid=(pk.num_crops * self.side, self.side),
                    merged=merged,
                    selection_s=selection_s / len(packs),
                    crops=pk.num_crops,
                    groups=groups.result(),
                )
            )
        # per crop sequence lengths; crops may differ under per-crop targets, so the trace is their mean
        trace = [round(sum(t[j] for t in traces) / max(len(traces), 1)) for j in range(self.num_layers)]
        return Encoded(features, images, encode_s=now() - start, selection_s=selection_s, encoder_layer_tokens=trace)

    def _candidate_sets(self, pk: _Packed, scope: Scope):
        return anyres.candidate_sets(pk, scope, self.side)

    def _select_image(self, method, budget, request, cap, feature_layers, pre, crop0, pk, packed):
        return anyres.select_image(
            method,
            budget,
            request,
            cap,
            feature_layers,
            pre,
            crop0,
            pk,
            packed,
            side=self.side,
            cls_offset=self.cls_offset,
            num_layers=self.num_layers,
            attention=self._attention,
            project=self.base.multi_modal_projector,
            newlines=self.newlines,
        )
