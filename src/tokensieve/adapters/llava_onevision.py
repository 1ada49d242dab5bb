"""LLaVA-OneVision images: LLaVA-NeXT's anyres layout on a CLS-free SigLIP tower.

Everything about crops, budgets, placement and the newline policy is LLaVA-NeXT's (see ``llava_next.py``). What
differs:

* **No CLS token.** The features are every patch (strategy ``full``). Where a method asks for CLS attention it gets
  the CLS-free fallback of the method notes: the mean attention each patch receives from all queries of its crop,
  head by head, computed from that layer's q/k. VisionZip has no CLS hidden state to keep.
* **Multi-image prompts** are not split into crops by the model (``batch_num_images``): each such image is one
  crop, followed by one newline.
* **Downsampled grids are refused.** ``anyres_max_N`` bilinearly shrinks the crop grid of a large image, after
  which a packed token is a blend of patches and no longer one candidate; such images raise a clear error rather
  than being compressed on a wrong layout.
* **Videos.** The model projects each frame, then halves its grid with bilinear pooling (after the projector), then
  adds one newline per video. Candidates are those pooled tokens, for every method (a pre-projector method's
  merges therefore happen in the LM's space on videos); the encoder signals are pooled onto the same grid by the
  model's own ``apply_pooling``. Scope ``image``/``frame`` (default): k per frame; ``global``: k per video. The
  video's closing newline is always kept. Images and videos can share a call and a batch.
"""

from __future__ import annotations

from typing import Any

import torch

from ..budget import Budget, Scope
from ..capture import capture_encoder
from ..errors import NonFiniteFeaturesError, UnsupportedModelError
from ..methods.base import Layout, Method, Signals
from ..report import ImageReport
from .base import Adapter, Encoded, now
from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava-onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    scopes = (Scope.IMAGE, Scope.CROP, Scope.FRAME, Scope.GLOBAL)
    encoder_inputs = (
        "pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
        "vision_aspect_ratio", "batch_num_images", "pixel_values_videos",
    )
    visual_inputs = ("pixel_values", "pixel_values_videos")

    def __init__(self, model) -> None:
        Adapter.__init__(self, model)
        base = model.model
        tower = base.vision_tower
        encoder = getattr(tower, "encoder", None)
        if encoder is None or not hasattr(encoder, "layers"):
            raise UnsupportedModelError(
                f"{type(model).__name__} with a {type(tower).__name__} vision tower is not supported: this adapter "
                "needs encoder.layers"
            )
        self.base = base
        self.layers = encoder.layers
        vc = model.config.vision_config
        self.side = vc.image_size // vc.patch_size
        self.grid = (self.side, self.side)
        self.per_crop = self.side * self.side
        self.cls_offset = 1 if hasattr(tower.embeddings, "class_embedding") else 0

    def tokens_per_image(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        return super().tokens_per_image(encoder_kwargs) if encoder_kwargs.get("pixel_values") is not None else []

    def tokens_per_video(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        pv = encoder_kwargs.get("pixel_values_videos")
        if pv is None:
            return []
        per_frame = (-(-self.side // 2)) ** 2  # the model's ceil-halved grid
        return [int(pv.shape[1]) * per_frame + 1] * int(pv.shape[0])

    def video_output(self, features):
        return torch.stack(features)  # the model takes videos as one [videos, tokens, d] tensor

    def encode(self, method: Method, budget: Budget, encoder_kwargs: dict[str, Any]) -> Encoded:
        if encoder_kwargs.get("pixel_values") is not None:
            encoded = super().encode(method, budget, encoder_kwargs)
        else:
            encoded = Encoded([], [])
        encoded.num_images = len(encoded.features)
        if encoder_kwargs.get("pixel_values_videos") is not None:
            self._encode_videos(method, budget, encoder_kwargs, encoded)
        return encoded

    def _encode_videos(self, method: Method, budget: Budget, encoder_kwargs: dict[str, Any], encoded: Encoded):
        start = now()
        strategy = self._strategy(encoder_kwargs)
        pv = encoder_kwargs["pixel_values_videos"]
        videos, frames = int(pv.shape[0]), int(pv.shape[1])
        fl = self.feature_layers(encoder_kwargs)[-1]
        request = method.request(self.num_layers, fl)
        with capture_encoder(self.layers, request, self._attention_parts) as cap:
            out = self.base.get_video_features(
                pixel_values_videos=pv, vision_feature_layer=self._feature_layer(encoder_kwargs),
                vision_feature_select_strategy=strategy, return_dict=True,
            )
            tokens = out.pooler_output  # [videos, frames * n + 1, D]
            if not bool(torch.isfinite(tokens).all()):
                raise NonFiniteFeaturesError("video features contain NaN or Inf; check pixel_values_videos and the dtype")
            pool = self.base.apply_pooling
            c = self.cls_offset
            n = (tokens.shape[1] - 1) // frames
            g = -(-self.side // 2)
            whole = budget.scope == Scope.GLOBAL
            sets, per = (videos, frames * n) if whole else (videos * frames, n)

            def regroup(x):  # [videos * frames, n, ...] -> [sets, per, ...]
                return x.reshape(sets, per, *x.shape[2:])

            def pooled_heads(x):  # [VF, H, T, ...] -> [sets, H, per, ...] pooled per head
                vf, h, t = x.shape[:3]
                flat = x.transpose(1, 2).reshape(vf, t, -1)
                y = pool(flat).reshape(vf, n, h, *x.shape[3:]).transpose(1, 2)
                return y.reshape(videos, frames, h, n, *x.shape[3:]).transpose(1, 2).reshape(sets, h, per, *x.shape[3:]) \
                    if whole else y

            t0 = now()
            signals = Signals(
                features=regroup(tokens[:, :-1].reshape(videos * frames, n, -1)),
                layout=Layout((frames * g, g) if whole else (g, g), 0),
                num_layers=self.num_layers,
                feature_layer=fl,
                hidden_states={i: regroup(pool(cap.hidden_states[i][:, c:])) for i in request.hidden_states},
                cls_attention={i: pooled_heads(self._attention(cap, i)[:, :, c:]) for i in request.cls_attention},
                keys={i: pooled_heads(cap.key_heads(i)[:, :, c:]) for i in request.keys},
            )
            k = budget.resolve(per, what="each video" if whole else "each video frame")
            sel = method.select(signals, k)
            chosen = sel.output(signals.features)
            if sel.tokens is not None and sel.anchors is not None:  # created tokens go where they stand
                order = sel.anchors.argsort(dim=1, stable=True)
                chosen = torch.gather(chosen, 1, order.unsqueeze(-1).expand_as(chosen))
            secs = now() - t0
        kept = chosen.reshape(videos, -1, chosen.shape[-1])
        idx = sel.indices.reshape(videos, -1)
        if not whole:  # frame-local indices -> video-wide
            idx = idx + (torch.arange(frames, device=idx.device) * n).repeat_interleave(sel.indices.shape[1])
        for v in range(videos):
            encoded.features.append(torch.cat([kept[v], tokens[v, -1:]]).to(tokens.dtype))
            encoded.images.append(
                ImageReport(
                    sample=-1, image=len(encoded.images), tokens_in=int(tokens.shape[1]),
                    tokens_out=int(kept.shape[1]) + 1, kept_indices=idx[v].tolist(), grid=(frames * g, g),
                    merged=sel.num_merged * (sets // videos), selection_s=secs / videos,
                )
            )
        encoded.selection_s += secs
        encoded.encode_s += now() - start
        if not encoded.encoder_layer_tokens:
            encoded.encoder_layer_tokens = [self.per_crop + self.cls_offset] * self.num_layers

    def _strategy(self, enc: dict[str, Any]) -> str:
        strategy = enc.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        wanted = "default" if self.cls_offset else "full"
        if strategy != wanted:
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={strategy!r} is not supported on {self.family} with this tower: "
                f"the packing needs exactly the patch grid ({wanted!r})"
            )
        return strategy

    def _aspect(self, enc: dict[str, Any]) -> str:
        return enc.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio

    def _num_crops(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        counts = super()._num_crops(encoder_kwargs)
        per_sample = encoder_kwargs.get("batch_num_images")
        if per_sample is None:
            return counts
        patched = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return [c if p else 1 for c, p in zip(counts, patched)]

    def _pack(self, ids, encoder_kwargs):
        newline = torch.tensor([-1.0], dtype=torch.float64)
        packed, _ = self.base.pack_image_features(
            ids, encoder_kwargs["image_sizes"], image_newline=newline, vision_aspect_ratio=self._aspect(encoder_kwargs)
        )
        packed = list(packed)
        for i, flat in enumerate(packed):
            if not bool((flat == flat.round()).all()) or flat[flat >= 0].unique().numel() != int((flat >= 0).sum()):
                raise UnsupportedModelError(
                    f"image {i} is large enough that {self._aspect(encoder_kwargs)} downsamples its crop grid; "
                    f"{self.family} compression does not handle blended crop grids yet (use a smaller image or "
                    "fewer grid pinpoints)"
                )
        return packed

    def _feature_kwargs(self, encoder_kwargs: dict[str, Any], strategy: str) -> dict[str, Any]:
        kwargs = super()._feature_kwargs(encoder_kwargs, strategy)
        kwargs.update(
            vision_aspect_ratio=self._aspect(encoder_kwargs), batch_num_images=encoder_kwargs.get("batch_num_images")
        )
        return kwargs

    def _attention(self, cap, layer: int) -> torch.Tensor:
        if self.cls_offset:
            return super()._attention(cap, layer)
        p = cap._parts[layer]
        q = cap.split_heads(cap.queries[layer], layer).float()
        k = cap.key_heads(layer).float()
        return ((q @ k.transpose(-1, -2)) * p.scale).softmax(dim=-1).mean(dim=-2)  # [crops, H, T] received
