"""The video path of the LLaVA-NeXT family (LLaVA-NeXT-Video, LLaVA-OneVision), as a mixin of their adapters.

* **Candidates are each frame's pooled tokens** (the model shrinks every frame's patch grid: NeXT-Video with its
  ``vision_resampler`` before the projector, OneVision with bilinear pooling after it), as the LM receives them, for
  every method; a pre-projector method's merges therefore happen in the LM's space on videos. Encoder signals
  (hidden states, attention, keys) are pooled onto the same grid by the model's own pooling, so they line up.
* **Budgets**: scope ``image`` (default), ``frame`` or ``crop``: k per frame (frames are what users reason about);
  ``global``: k per video, ranked across its frames (grid-based methods see the frames stacked vertically).
* Kept tokens stay in frame and raster order; a created token goes where its anchor is. Positions are re-indexed.
* Images and videos can share a call and a batch; all videos of a call have the same frame count (the model
  stacks them), so every video keeps the same number of tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..budget import Budget, Scope
from ..engine.capture import capture_encoder
from ..engine.encoder_stage import run_encoder_stage
from ..engine.select import select_each
from ..errors import BudgetError, NonFiniteFeaturesError, UnsupportedModelError
from ..methods.base import IN_ENCODER, Layout, Method, Signals
from ..methods.encoder import EncoderMethod
from ..report import ImageReport, MergeGroups
from .base import Encoded, now


class VideoFrames:
    """Videos for a LLaVA-NeXT-family adapter: combine as ``class X(VideoFrames, LlavaNextAdapter)``; images go to
    the NeXT adapter (``super()``), videos run here. The family sets :meth:`_video_pool` (its frame pooling),
    :meth:`_frame_features` where it projects before pooling, and ``video_newline``."""

    video_newline = False
    """Whether the model closes each video with an ``image_newline`` token (kept whatever the selection)."""

    def _video_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The model's frame pooling, applied to [frames, patches, channels] of any channel count."""
        raise NotImplementedError

    def tokens_per_image(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        return super().tokens_per_image(encoder_kwargs) if encoder_kwargs.get("pixel_values") is not None else []

    def tokens_per_video(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        pv = encoder_kwargs.get("pixel_values_videos")
        if pv is None:
            return []
        return [int(pv.shape[1]) * self._frame_tokens() + int(self.video_newline)] * int(pv.shape[0])

    def _frame_tokens(self) -> int:
        """Tokens the model's frame pooling leaves of one frame (read off the pooling itself)."""
        return int(self._video_pool(torch.zeros(1, self.per_crop, 1)).shape[1])

    def video_output(self, features):
        return torch.stack(features)  # the model takes videos as one [videos, tokens, d] tensor

    def encode(self, method: Method, budget: Budget, encoder_kwargs: dict[str, Any], spans=None) -> Encoded:
        if encoder_kwargs.get("pixel_values") is not None:
            encoded = super().encode(method, budget, encoder_kwargs, spans)
        else:
            encoded = Encoded([], [])
        encoded.num_images = len(encoded.features)
        if encoder_kwargs.get("pixel_values_videos") is not None:
            if method.stage == IN_ENCODER:
                self._encode_videos_in_encoder(method, budget, encoder_kwargs, encoded)
            else:
                self._encode_videos(method, budget, encoder_kwargs, encoded)
        return encoded

    def _frame_features(self, rows: torch.Tensor) -> torch.Tensor:
        """[frames, patches, d] feature-layer rows -> the frame tokens the LM gets (pool, then project)."""
        return self.base.multi_modal_projector(self._video_pool(rows))

    def _window_groups(self) -> torch.Tensor | None:
        """[n, u]: the patches behind each pooled frame token, read off the model's pooling run on one-hot patches;
        ``None`` unless every token pools its own disjoint window of equal size (then a frame can lose whole
        windows and the pooling of the others is unchanged)."""
        try:
            pooled = self._video_pool(torch.eye(self.per_crop).unsqueeze(0))[0]  # [n, P]: weight of patch p in token i
        except (RuntimeError, ValueError):
            return None  # a pooling that is not per channel (a convolution)
        members = pooled.abs() > 1e-6
        sizes = members.sum(1)
        if bool((sizes != sizes[0]).any()) or int(members.sum(0).max()) != 1 or int(members.sum(0).min()) != 1:
            return None
        return members.nonzero()[:, 1].view(pooled.shape[0], -1)

    def _encode_videos_in_encoder(
        self, method: EncoderMethod, budget: Budget, encoder_kwargs: dict[str, Any], encoded: Encoded
    ) -> None:
        """Cut inside the tower frame by frame, by whole pooling windows, then pool and project as the model does.

        Candidates are the frame tokens the LM receives, as for the other stages; each is the pooling of one window
        of patches, so a cut keeps or merges whole windows. The kept rows go back onto the frame's grid (zeros
        elsewhere) and the model's own pooling runs: each kept token pools only its own window.
        """
        start = now()
        self._strategy(encoder_kwargs)
        groups = self._window_groups()
        if groups is None:
            raise UnsupportedModelError(
                f"{method.name} cuts inside the encoder, but {self.family}'s frame pooling mixes patches across "
                "windows (or is a convolution) for this grid, so a frame cannot lose whole tokens there; use a pre- or "
                "post-projector method for videos"
            )
        if budget.scope == Scope.GLOBAL:
            raise BudgetError(
                f"{method.name} cuts inside the encoder, where each frame runs on its own: scope 'global' (ranking "
                "across frames) is not possible there; use 'image' or 'frame'"
            )
        pv = encoder_kwargs["pixel_values_videos"]
        videos, frames = int(pv.shape[0]), int(pv.shape[1])
        n, c = groups.shape[0], self.cls_offset
        g = math.isqrt(n)
        k = budget.resolve(n, what="each video frame")
        feature_layers = self.feature_layers(encoder_kwargs)
        plan = method.plan(self.num_layers, min(feature_layers))
        skip = bool(getattr(method, "skip_unused_layers", True))
        res = run_encoder_stage(
            self.layers,
            self._attention_parts,
            method,
            plan,
            Layout((g, g), 1),
            k,
            feature_layer=min(feature_layers),
            record=feature_layers,
            run=lambda x: self.base.vision_tower(x, output_hidden_states=False, return_dict=True),
            pixel_values=pv.flatten(0, 1),
            stop_after=max(feature_layers) if skip else None,
            cls_free=not c,
            units=groups,
        )
        rows = torch.stack(
            [torch.cat([res.hidden[f][j][c:] for f in feature_layers], -1) for j in range(videos * frames)]
        )
        if not bool(torch.isfinite(rows).all()):
            raise NonFiniteFeaturesError("video features contain NaN or Inf; check pixel_values_videos and the dtype")
        full = rows.new_zeros(videos * frames, self.per_crop, rows.shape[-1])
        kept = [res.positions[j][1:].cpu() for j in range(videos * frames)]  # window ids, group order
        for j in range(videos * frames):
            full[j, groups[kept[j]].flatten().to(full.device)] = rows[j]
        tokens = self._frame_features(full)  # [VF, n, D]
        newline = (
            self.base.image_newline[None].to(tokens.dtype)
            if self.video_newline
            else tokens.new_zeros(0, tokens.shape[-1])
        )
        for v in range(videos):
            picked, idx, merged = [], [], 0
            groups = MergeGroups(frames * n)
            for f in range(frames):
                j = v * frames + f
                order = kept[j].argsort()
                picked.append(tokens[j, kept[j][order].to(tokens.device)])
                idx += (f * n + kept[j][order]).tolist()
                merged += int((res.sizes[j][1:] > 1).sum())
                groups.add(f * n + torch.arange(n), torch.arange(n)[kept[j]], res.groups[j], n)
            feats = torch.cat(picked + [newline])
            encoded.features.append(feats)
            encoded.images.append(
                ImageReport(
                    sample=-1,
                    image=len(encoded.images),
                    tokens_in=frames * n + int(self.video_newline),
                    tokens_out=int(feats.shape[0]),
                    kept_indices=idx,
                    grid=(frames * g, g),
                    merged=merged,
                    selection_s=res.selection_s / videos,
                    frames=frames,
                    groups=groups.result(),
                )
            )
        encoded.selection_s += res.selection_s
        encoded.encode_s += now() - start
        if not encoded.encoder_layer_tokens:
            encoded.encoder_layer_tokens = [
                round(sum(t[i] for t in res.traces) / len(res.traces)) for i in range(self.num_layers)
            ]

    def _encode_videos(self, method: Method, budget: Budget, encoder_kwargs: dict[str, Any], encoded: Encoded):
        start = now()
        strategy = self._strategy(encoder_kwargs)
        pv = encoder_kwargs["pixel_values_videos"]
        videos, frames = int(pv.shape[0]), int(pv.shape[1])
        fl = self.feature_layers(encoder_kwargs)[-1]
        request = method.request(self.num_layers, fl)
        with capture_encoder(self.layers, request, self._attention_parts) as cap:
            out = self.base.get_video_features(
                pixel_values_videos=pv,
                vision_feature_layer=self._feature_layer(encoder_kwargs),
                vision_feature_select_strategy=strategy,
                return_dict=True,
            )
            tokens = out.pooler_output  # [videos, frames * n (+ 1 newline), D]
            if not bool(torch.isfinite(tokens).all()):
                raise NonFiniteFeaturesError(
                    "video features contain NaN or Inf; check pixel_values_videos and the dtype"
                )
            pool = self._video_pool
            c = self.cls_offset
            n = self._frame_tokens()
            g = math.isqrt(n)
            whole = budget.scope == Scope.GLOBAL
            sets, per = (videos, frames * n) if whole else (videos * frames, n)

            def regroup(x):  # [videos * frames, n, ...] -> [sets, per, ...]
                return x.reshape(sets, per, *x.shape[2:])

            def pooled_heads(x):  # [VF, H, T, ...] -> [sets, H, per, ...] pooled per head
                vf, h, t = x.shape[:3]
                flat = x.transpose(1, 2).reshape(vf, t, -1)
                y = pool(flat).reshape(vf, n, h, *x.shape[3:]).transpose(1, 2)
                return (
                    y.reshape(videos, frames, h, n, *x.shape[3:]).transpose(1, 2).reshape(sets, h, per, *x.shape[3:])
                    if whole
                    else y
                )

            t0 = now()
            signals = Signals(
                features=regroup(tokens[:, : frames * n].reshape(videos * frames, n, -1)),
                layout=Layout((frames * g, g) if whole else (g, g), 0),
                num_layers=self.num_layers,
                feature_layer=fl,
                hidden_states={i: regroup(pool(cap.hidden_states[i][:, c:])) for i in request.hidden_states},
                cls_attention={i: pooled_heads(self._attention(cap, i)[:, :, c:]) for i in request.cls_attention},
                keys={i: pooled_heads(cap.key_heads(i)[:, :, c:]) for i in request.keys},
                attention_received={
                    i: regroup(pool(cap.attention_received(i)[:, c:].unsqueeze(-1)).squeeze(-1))
                    for i in request.attention_received
                },
            )
            k = budget.resolve(per, what="each video" if whole else "each video frame")
            chosen, idx, merged = [], [], []  # per set (a frame, or a whole video); counts may differ when adaptive
            sels = select_each(method, signals, k)
            for j, sel in enumerate(sels):
                out = sel.output(signals.features[j : j + 1])[0]
                if sel.tokens is not None and sel.anchors is not None:  # created tokens go where they stand
                    out = out[sel.anchors[0].argsort(stable=True)]
                chosen.append(out)
                idx.append(sel.indices[0] + (0 if whole else (j % frames) * n))  # frame-local -> video-wide
                merged.append(sel.num_merged)
            secs = now() - t0
        per_video = sets // videos
        for v in range(videos):
            mine = slice(v * per_video, (v + 1) * per_video)
            groups = MergeGroups(frames * n)
            for j, sel in enumerate(sels[mine]):
                groups.add(
                    j * per + torch.arange(per),
                    sel.indices[0],
                    None if sel.groups is None else sel.groups[0],
                    sel.num_out,
                )
            kept = torch.cat(chosen[mine])
            encoded.features.append(torch.cat([kept, tokens[v, frames * n :]]).to(tokens.dtype))
            encoded.images.append(
                ImageReport(
                    sample=-1,
                    image=len(encoded.images),
                    tokens_in=int(tokens.shape[1]),
                    tokens_out=int(kept.shape[0]) + int(self.video_newline),
                    kept_indices=torch.cat(idx[mine]).tolist(),
                    grid=(frames * g, g),
                    merged=sum(merged[mine]),
                    selection_s=secs / videos,
                    frames=frames,
                    groups=groups.result(),
                )
            )
        encoded.selection_s += secs
        encoded.encode_s += now() - start
        if not encoded.encoder_layer_tokens:
            encoded.encoder_layer_tokens = [self.per_crop + self.cls_offset] * self.num_layers
