"""LLaVA-NeXT-Video: LLaVA-NeXT's anyres images plus videos whose frames are pooled by its ``vision_resampler``
before the projector (the shared video path: ``videos.py``)."""

from __future__ import annotations

import torch

from ..budget import Scope
from .llava_next import LlavaNextAdapter
from .videos import VideoFrames


class LlavaNextVideoAdapter(VideoFrames, LlavaNextAdapter):
    family = "llava-next-video"
    model_classes = ("LlavaNextVideoForConditionalGeneration",)
    model_types = ("llava_next_video",)
    display_names = ("LLaVA-NeXT-Video",)
    scopes = (Scope.IMAGE, Scope.CROP, Scope.FRAME, Scope.GLOBAL)
    encoder_inputs = LlavaNextAdapter.encoder_inputs + ("pixel_values_videos",)
    visual_inputs = ("pixel_values", "pixel_values_videos")
    video_newline = False

    def _video_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The model's frame pooling, applied to [frames, patches, channels] of any channel count."""
        return self.base.vision_resampler(x)
