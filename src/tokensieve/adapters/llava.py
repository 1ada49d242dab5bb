"""LLaVA-1.5 layout: CLIP tower, features from ``hidden_states[vision_feature_layer]``, MLP projector, decoder LM.

Every image yields the same fixed grid of tokens, so selection can happen before the projector: the projector then
maps only the kept tokens, and merge-based methods merge in the encoder's space, as the papers do.
"""

from __future__ import annotations

from typing import Any

import torch

from ..budget import Budget, Scope
from ..engine.capture import (
    capture_encoder,
)
from ..engine.host import read_lists
from ..engine.select import grid_cut, grid_outputs, grid_select, selection_lists
from ..methods.base import IN_ENCODER, IN_LLM, POST_PROJECTOR, PRE_PROJECTOR, Method
from ..methods.encoder import EncoderMethod
from ..report import ImageReport
from .base import Adapter, Encoded, now
from .towers import ClipTower


class LlavaAdapter(ClipTower, Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)
    display_names = ("LLaVA-1.5",)
    # one grid per image: an image is its only crop
    scopes = (Scope.IMAGE, Scope.CROP)
    stages = (PRE_PROJECTOR, POST_PROJECTOR, IN_ENCODER, IN_LLM)
    signal_kinds = Adapter.signal_kinds + ("attention_received",)
    encoder_inputs = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    def __init__(self, model) -> None:
        super().__init__(model)
        self._init_tower(model)

    def tokens_per_image(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        n = self.grid[0] * self.grid[1] + self.num_prefix(encoder_kwargs)
        return [n] * int(encoder_kwargs["pixel_values"].shape[0])

    @classmethod
    def limits_of(cls, config) -> dict[Scope, int]:
        vc = config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2 + cls.prefix_of(config)
        return {Scope.IMAGE: n, Scope.CROP: n}  # one grid per image: an image is its only crop

    # -- encode + select ---------------------------------------------------------------------------------------
    def encode(self, method: Method, budget: Budget, encoder_kwargs: dict[str, Any], spans=None) -> Encoded:
        if method.stage == IN_ENCODER:
            return self._encode_in_encoder(method, budget, encoder_kwargs)
        start = now()
        pixel_values = encoder_kwargs["pixel_values"]
        n_img = int(pixel_values.shape[0])
        prefix = self.num_prefix(encoder_kwargs)
        n_tok = self.grid[0] * self.grid[1] + prefix
        k = budget.resolve(n_tok, what="each image")
        feature_layers = self.feature_layers(encoder_kwargs)
        request = method.request(self.num_layers, feature_layers[-1])  # selectors read the last feature layer
        state: dict[str, Any] = {}

        def select(features: torch.Tensor) -> torch.Tensor:
            t0 = now()
            sels = grid_select(
                method,
                k,
                cap,
                request,
                features,
                grid=self.grid,
                num_prefix=prefix,
                num_layers=self.num_layers,
                feature_layers=feature_layers,
            )
            outs = grid_outputs(sels, features)
            # adaptive budgets give images different counts: pad to the longest and trim after the projector
            out = torch.nn.utils.rnn.pad_sequence(outs, batch_first=True)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            state["selection"], state["lengths"], state["time"] = sels, [o.shape[0] for o in outs], now() - t0
            return out

        call = dict(
            pixel_values=pixel_values,
            vision_feature_layer=self._feature_layer(encoder_kwargs),
            vision_feature_select_strategy=self._strategy(encoder_kwargs),
            return_dict=True,
        )
        if encoder_kwargs.get("image_sizes") is not None:
            call["image_sizes"] = encoder_kwargs["image_sizes"]
        extra = tuple(feature_layers) if request.cls_hidden else ()
        with capture_encoder(self.layers, request, self._attention_parts, extra) as cap:
            if method.stage == POST_PROJECTOR:
                out = self.base.get_image_features(**call)
                features = list(select(torch.stack(list(out.pooler_output))).unbind(0))
            else:
                hook = self.base.multi_modal_projector.register_forward_pre_hook(lambda mod, args: (select(args[0]),))
                try:
                    out = self.base.get_image_features(**call)
                finally:
                    hook.remove()
                features = list(out.pooler_output)
        features = [f[:n] for f, n in zip(features, state["lengths"])]
        per_image = state["time"] / n_img
        images = []
        kept, groups = selection_lists(state["selection"], prefix)
        for i, sel in enumerate(state["selection"]):
            images.append(
                ImageReport(
                    sample=-1,
                    image=i,
                    tokens_in=n_tok,
                    tokens_out=int(features[i].shape[0]),
                    kept_indices=kept[i],
                    grid=self.grid,
                    merged=sel.num_merged,
                    selection_s=per_image,
                    groups=groups[i],
                )
            )
        # HF runs every encoder layer whatever the feature layer; all of them at full length here
        trace = [self.grid[0] * self.grid[1] + 1] * self.num_layers
        return Encoded(features, images, encode_s=now() - start, selection_s=state["time"], encoder_layer_tokens=trace)

    def _encode_in_encoder(self, method: EncoderMethod, budget: Budget, encoder_kwargs: dict[str, Any]) -> Encoded:
        """Cut inside the CLIP tower, then project the recorded feature layer(s) of the survivors.

        The tower is called directly (not through ``get_image_features``) because the features are the stage's own
        post-cut records, and because the tower may stop early: layers after the last feature layer feed nothing
        the LM reads (LLaVA reads ``hidden_states[-2]``), so ``method.skip_unused_layers`` (default on) skips them.
        """
        start = now()
        pixel_values = encoder_kwargs["pixel_values"]
        prefix = self.num_prefix(encoder_kwargs)
        n_tok = self.grid[0] * self.grid[1] + prefix
        k = budget.resolve(n_tok, what="each image")
        feature_layers = self.feature_layers(encoder_kwargs)
        skip = bool(getattr(method, "skip_unused_layers", True))
        res, selected = grid_cut(
            method,
            k,
            layers=self.layers,
            attention_parts=self._attention_parts,
            grid=self.grid,
            num_prefix=prefix,
            num_layers=self.num_layers,
            feature_layers=feature_layers,
            run=lambda pv: self.base.vision_tower(pv, output_hidden_states=False, return_dict=True),
            pixel_values=pixel_values,
            stop_after=max(feature_layers) if skip else None,
        )
        n_img = int(pixel_values.shape[0])
        features = list(self.base.multi_modal_projector(selected).unbind(0))
        images = []
        # one read of every image's kept positions, merged sizes and merge owners (for the reports)
        owners = [torch.where(o >= 0, o + prefix, -1) for o in res.groups if o is not None]
        values = read_lists([p[1:] for p in res.positions] + [(s[1:] > 1).sum() for s in res.sizes] + owners)
        positions, merged, rest = values[:n_img], values[n_img : 2 * n_img], iter(values[2 * n_img :])
        for i in range(n_img):
            images.append(
                ImageReport(
                    sample=-1,
                    image=i,
                    tokens_in=n_tok,
                    tokens_out=int(features[i].shape[0]),
                    kept_indices=positions[i],
                    grid=self.grid,
                    merged=merged[i][0],
                    selection_s=res.selection_s / n_img,
                    # a patch row's output token: after the CLS token under the "full" strategy
                    groups=None if res.groups[i] is None else next(rest),
                )
            )
        # images may differ under per-image schedules: the trace is their mean, so that trace x images = total
        trace = [round(sum(t[j] for t in res.traces) / n_img) for j in range(self.num_layers)]
        return Encoded(
            features, images, encode_s=now() - start, selection_s=res.selection_s, encoder_layer_tokens=trace
        )
