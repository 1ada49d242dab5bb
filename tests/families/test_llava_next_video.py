"""LLaVA-NeXT-Video: anyres images and resampled video frames in one padded batch."""

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokensieve import Sieve
from tokensieve.adapters import get_adapter
from tokensieve.adapters.llava_next_video import LlavaNextVideoAdapter
from tokensieve.errors import BudgetError
from tokensieve.methods import get_method
from tokensieve.methods.base import IN_ENCODER
from tokensieve.models.tiny import demo_image

from .builders import build_tiny_llava_next_video
from .helpers import assert_unit_cut_equals_pick, greedy, logits, methods_for

PER_FRAME = 4  # 4x4 patches average-pooled with stride 2

# the stages this family supports today; in-encoder methods work on its images only (tested below)
METHODS = [m for m in methods_for(LlavaNextVideoAdapter) if get_method(m).stage != IN_ENCODER]


@pytest.fixture(scope="module")
def next_video():
    return build_tiny_llava_next_video()


def _frames(seed):
    return [demo_image(32, seed + i) for i in range(3)]


@pytest.fixture(scope="module")
def batch(next_video):
    _, make = next_video
    return make(
        ["user : <video> what ? assistant :", "user : <image> <video> what is this ? assistant :"],
        [demo_image(64, 0).resize((32, 20))],
        [_frames(0), _frames(5)],
    )


@pytest.fixture(scope="module")
def vanilla(next_video, batch):
    """The uncompressed model's logits and greedy tokens, computed once for every keep-all comparison."""
    model, _ = next_video
    return logits(model, batch), greedy(model, batch)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget,scope,per_video", [(2, "image", 6), (4, "global", 4)])
def test_video_counts(next_video, batch, method, budget, scope, per_video):
    model, _ = next_video
    sieve = Sieve(method, budget, scope=scope)
    with sieve(model):
        greedy(model, batch, n=2)
    image, video0, video1 = sieve.last_report.images
    assert (image.sample, video0.sample, video1.sample) == (1, 0, 1)
    assert video0.tokens_in == 3 * PER_FRAME and video0.tokens_out == video1.tokens_out == per_video
    if scope == "image":
        # 2 tokens for the image, split over its 5 crops as (1, 1, 0, 0, 0): the base view's token, then one grid
        # token with its row's newline; at k=1 VisionZip keeps each crop's CLS token, which has no row
        assert image.tokens_out == (2 if method == "visionzip" else 3)


def test_forward_equals_hand_written_reference(next_video):
    """random, 2 per frame, on videos only: the model's own frame tokens gathered by hand."""
    model, make = next_video
    inputs = make(
        ["user : <video> what ? assistant :", "user : <video> what is it ? assistant :"], (), [_frames(1), _frames(7)]
    )
    sieve = Sieve("random", 2)
    with sieve(model):
        got = logits(model, inputs)
    keep = torch.randperm(PER_FRAME, generator=torch.Generator().manual_seed(0))[:2].sort().values
    keep = torch.cat([keep + f * PER_FRAME for f in range(3)])
    with torch.inference_mode():
        tokens = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    vid = model.config.video_token_id
    rows = []
    for b in range(2):
        pos = (ids[b] == vid).nonzero().flatten()
        drop = torch.ones(pos.numel(), dtype=torch.bool)
        drop[keep] = False
        row = torch.ones(ids.shape[1], dtype=torch.bool)
        row[pos[drop]] = False
        rows.append(row)
    length = max(int(r.sum()) for r in rows)
    new_ids = torch.stack(
        [torch.cat([ids[b, :0].new_zeros(length - int(r.sum())), ids[b, r]]) for b, r in enumerate(rows)]
    )
    new_mask = torch.stack(
        [torch.cat([mask[b, :0].new_zeros(length - int(r.sum())), mask[b, r]]) for b, r in enumerate(rows)]
    )
    with torch.inference_mode():
        ref = model(
            input_ids=new_ids,
            attention_mask=new_mask,
            mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=tokens[:, keep])},
        ).logits
    assert torch.equal(sieve.last_report.input_ids[new_mask.bool()], new_ids[new_mask.bool()])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["evoprune", "flowcut"])
def test_in_encoder_methods_on_images_and_videos(next_video, batch, vanilla, method):
    """Keep-all equals vanilla; frames lose whole pooling windows, k per frame; global is refused."""
    model, _ = next_video
    with Sieve(method, 1.0)(model):
        torch.testing.assert_close(logits(model, batch), vanilla[0], rtol=0, atol=1e-5)
    sieve = Sieve(method, 2)
    with sieve(model):
        greedy(model, batch, n=2)
    videos = [im for im in sieve.last_report.images if im.frames]
    assert [im.tokens_out for im in videos] == [2 * im.frames for im in videos]
    if method == "flowcut":  # the layer producing the features (2 of 4) runs on the cut sequence
        trace = sieve.last_report.encoder_layer_tokens
        assert trace[2] < trace[1] and trace[3] == 0
    for im in videos:
        assert [sum(i // PER_FRAME == f for i in im.kept_indices) for f in range(im.frames)] == [2] * im.frames
    with pytest.raises(BudgetError, match="global"):
        with Sieve(method, 2, scope="global")(model):
            logits(model, batch)


def test_in_encoder_video_cut_after_the_feature_layer_equals_pre_projector_selection(next_video, batch):

    model, make = next_video
    videos = make(
        ["user : <video> what ? assistant :", "user : <video> what is this ? assistant :"], [], [_frames(0), _frames(5)]
    )
    fl = get_adapter(model).feature_layers({})[-1]
    report = assert_unit_cut_equals_pick(model, videos, fl - 1, [0, 3], "frame")
    assert [im.kept_indices for im in report.images] == [[0, 3, 4, 7, 8, 11]] * 2
