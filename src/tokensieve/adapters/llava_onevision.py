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
* **Videos** follow ``llava_next_video.py``; here the frame grid is halved by bilinear pooling *after* the
  projector and each video ends with one newline, which is always kept.
"""

from __future__ import annotations

from typing import Any

import torch

from ..budget import Scope
from ..engine.attention import received_attention
from ..errors import UnsupportedModelError
from .base import Adapter
from .llava_next import LlavaNextAdapter
from .videos import VideoFrames


class LlavaOnevisionAdapter(VideoFrames, LlavaNextAdapter):
    family = "llava-onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)
    display_names = ("LLaVA-OneVision",)
    scopes = (Scope.IMAGE, Scope.CROP, Scope.FRAME, Scope.GLOBAL)
    encoder_inputs = LlavaNextAdapter.encoder_inputs + (
        "pixel_values_videos",
        "vision_aspect_ratio",
        "batch_num_images",
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

    video_newline = True

    def _video_pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.apply_pooling(x)

    def _frame_features(self, rows: torch.Tensor) -> torch.Tensor:
        """OneVision projects before it pools."""
        return self.base.apply_pooling(self.base.multi_modal_projector(rows))

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
        q = cap.split_heads(cap.queries[layer], layer).float()
        k = cap.key_heads(layer).float()
        n = q.shape[-2]
        return received_attention(q, k, cap.scale(layer), chunk=n) / n  # [crops, H, T]: mean received attention
