"""LLaVA-OneVision images: NeXT's anyres policies on a CLS-free SigLIP tower, multi-image prompts, refusals."""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.adapters import get_adapter
from tokensieve.errors import UnsupportedModelError
from tokensieve.methods.base import EncoderMethod, EncoderPlan
from tokensieve.models.tiny import demo_image

from .builders import build_tiny_onevision
from .helpers import (
    assert_adaptive_is_per_set,
    assert_unit_cut_equals_pick,
    assert_vispruner_ranks_like_fastervlm,
    greedy,
    logits,
)

SIDE = 4


@pytest.fixture(scope="module")
def onevision():
    return build_tiny_onevision()


@pytest.fixture(scope="module")
def batch(onevision):
    _, make = onevision
    images = [demo_image(64, 0).resize((32, 20)), demo_image(64, 1).resize((16, 40))]
    frames = [demo_image(32, s) for s in range(3)]
    return make(
        ["user : <image> what ? assistant :", "user : <image> <video> what is this ? assistant :"], images, [frames]
    )


@pytest.fixture(scope="module")
def vanilla(onevision, batch):
    """The uncompressed model's logits and greedy tokens, computed once for every keep-all comparison."""
    model, _ = onevision
    return logits(model, batch), greedy(model, batch)


def test_fastervlm_uses_mean_received_attention(onevision):
    """No CLS: FasterVLM keeps each crop's patches that receive the most attention, checked against eager maps."""
    model, make = onevision
    # sizes that fill their pinpoint exactly, so no patch is unpadded away: 2x2 and 3x1 grids of 16 px crops
    inputs = make(
        ["user : <image> what ? assistant :", "user : <image> what is it ? assistant :"],
        [demo_image(64, 5).resize((32, 32)), demo_image(64, 6).resize((16, 48))],
    )
    sieve = Sieve("fastervlm", 3, scope="crop")
    with sieve(model):
        logits(model, inputs)
    eager, _ = build_tiny_onevision()
    eager.model.vision_tower.set_attn_implementation("eager")
    for i, (im, crops) in enumerate(zip(sieve.last_report.images, [5, 4])):
        with torch.inference_mode():
            att = eager.model.vision_tower(inputs["pixel_values"][i, :crops], output_attentions=True).attentions[-1]
        scores = att.mean(dim=2).mean(dim=1)  # attention received (mean over queries), then head mean: [crops, T]
        expected = scores.topk(3, dim=-1).indices.sort(dim=-1).values
        got = torch.tensor(im.kept_indices).view(crops, 3) % (SIDE * SIDE)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["evocut", "fastervlm", "vispruner", "visionzip", "pool", "divprune"])
@pytest.mark.parametrize("budget,scope,per_video", [(2, "frame", 3 * 2), (1.0, "image", 3 * 4), (5, "global", 5)])
def test_video_budget_per_frame_or_per_video(onevision, batch, method, budget, scope, per_video):
    model, _ = onevision
    if method == "pool" and scope == "global":
        budget = 6  # a 6x2 grid of the 3 stacked 2x2 frames
        per_video = 6
    sieve = Sieve(method, budget, scope=scope)
    with sieve(model):
        out = greedy(model, batch, n=2)
    video = sieve.last_report.images[-1]
    assert video.sample == 1 and video.tokens_in == 3 * 4 + 1
    assert video.tokens_out == per_video + 1  # the video's closing newline stays
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    if scope == "frame" and method != "visionzip":
        assert torch.bincount(torch.tensor(video.kept_indices) // 4).tolist() == [2, 2, 2]


def test_multi_image_prompt_uses_one_crop_per_image(onevision):
    model, make = onevision
    inputs = make(["user : <image> <image> what ? assistant :"], [[demo_image(40, 2), demo_image(40, 3)]])
    assert inputs["batch_num_images"].tolist() == [2]
    sieve = Sieve("random", 5)
    with sieve(model):
        greedy(model, inputs, n=2)
    assert [len(im.kept_indices) for im in sieve.last_report.images] == [5, 5]
    assert all(max(im.kept_indices) < SIDE * SIDE for im in sieve.last_report.images)


def test_downsampled_grid_is_refused_and_model_untouched(onevision):
    model, make = onevision
    # 48x48 with 16 px crops: a 3x3 grid, above anyres_max_4 -> the model blends the grid down
    model.config.vision_aspect_ratio = "anyres_max_4"
    try:
        big = make(["user : <image> what ? assistant :"], [demo_image(48, 4)])
        ref = logits(model, big)
        with Sieve("random", 4)(model):
            with pytest.raises(UnsupportedModelError, match="downsamples its crop grid"):
                logits(model, big)
        assert torch.equal(logits(model, big), ref)
    finally:
        model.config.vision_aspect_ratio = "anyres_max_9"


@pytest.fixture(scope="module")
def filled_images(onevision):
    """Images only, sizes that fill their pinpoint (nothing unpadded): 2x2 and 3x1 grids of 16 px crops."""
    _, make = onevision
    return make(
        ["user : <image> what ? assistant :", "user : <image> what is it ? assistant :"],
        [demo_image(64, 5).resize((32, 32)), demo_image(64, 6).resize((16, 48))],
    )


@pytest.mark.parametrize("method", ["evoprune", "flowcut"])
def test_in_encoder_on_the_cls_free_tower(onevision, batch, vanilla, filled_images, method):
    model, _ = onevision
    with Sieve(method, 1.0)(model):
        torch.testing.assert_close(logits(model, batch), vanilla[0], rtol=0, atol=1e-5)
    sieve = Sieve(method, 5, scope="crop")
    with sieve(model):
        greedy(model, filled_images, n=2)
    assert [len(im.kept_indices) for im in sieve.last_report.images] == [
        5 * im.crops for im in sieve.last_report.images
    ]
    if method == "flowcut":  # SigLIP's last layer produces the features: it already runs on the 5 kept rows
        assert sieve.last_report.encoder_layer_tokens[-1] == 5
    video = Sieve(method, 2, scope="frame")  # 2 of the 4 pooled tokens of each frame, plus the video's newline
    with video(model):
        greedy(model, batch, n=2)
    (vid,) = [im for im in video.last_report.images if im.frames]
    assert vid.tokens_out == 2 * vid.frames + 1 and len(vid.kept_indices) == 2 * vid.frames


def test_video_in_encoder_needs_window_exact_pooling():
    """On an odd patch grid OneVision's bilinear frame pooling blends neighbouring patches: refused, clearly."""
    model, make = build_tiny_onevision(image_size=20)
    inputs = make(["user : <video> what ? assistant :"], [], [[demo_image(20, s) for s in range(2)]])
    with Sieve("evoprune", 2)(model):
        with pytest.raises(UnsupportedModelError, match="mixes patches across windows"):
            logits(model, inputs)


def test_in_encoder_cut_after_the_feature_layer_equals_pre_projector_selection(onevision, filled_images):

    model, _ = onevision
    # OneVision reads the last layer, so the cut comes after the last layer
    assert_unit_cut_equals_pick(
        model, filled_images, model.config.vision_config.num_hidden_layers - 1, [1, 2, 4, 8, 11, 15], "crop"
    )


class Spy(EncoderMethod):
    """Records what a method sees at one layer and cuts nothing but the last patches."""

    name = "spy"
    description = "test helper"

    def __init__(self, layer):
        self.layer, self.seen = layer, None

    def plan(self, num_layers, feature_layer):
        return EncoderPlan((self.layer,), cls_attention=True, keys=True, values=True)

    def cut(self, state):
        self.seen = state
        keep = torch.arange(state.target + 1).expand(state.hidden.shape[0], -1)
        from tokensieve.methods.base import EncoderCut

        return EncoderCut(keep)


def test_virtual_cls_is_the_mean_row_and_the_mean_query_attention(onevision, filled_images):
    """On a CLS-free tower methods see a row 0 that never enters the encoder: mean hidden / key / value, and the
    softmax of the mean query over the real keys (FlowCut's global query), computed here from the layer by hand."""
    model, _ = onevision
    layer = get_adapter(model).layers[1]
    got = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: got.setdefault("q", o)),
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: got.setdefault("k", o)),
    ]
    spy = Spy(1)
    try:
        with Sieve(spy, 8, scope="crop")(model):
            logits(model, filled_images)
    finally:
        for h in hooks:
            h.remove()
    st = spy.seen
    attn = layer.self_attn
    heads, hd = attn.num_heads, attn.head_dim
    q = got["q"].view(got["q"].shape[0], -1, heads, hd).transpose(1, 2).mean(dim=2, keepdim=True)
    k = got["k"].view(got["k"].shape[0], -1, heads, hd).transpose(1, 2)
    want = ((q @ k.transpose(-1, -2)).squeeze(-2) * attn.scale).softmax(-1)
    assert st.hidden.shape[1] == SIDE * SIDE + 1 and bool((st.positions[:, 0] == -1).all())
    torch.testing.assert_close(st.hidden[:, 0], st.hidden[:, 1:].mean(1))
    torch.testing.assert_close(st.keys[:, :, 0], st.keys[:, :, 1:].mean(2))
    torch.testing.assert_close(st.values[:, :, 0], st.values[:, :, 1:].mean(2))
    assert bool((st.cls_attention[..., 0] == 0).all())
    torch.testing.assert_close(st.cls_attention[..., 1:], want, rtol=1e-5, atol=1e-6)


def test_vispruner_important_tokens_use_the_cls_free_fallback(onevision, batch):
    """Images (per crop) and videos (per frame): the mean-received-attention ranking FasterVLM uses."""
    model, _ = onevision
    assert_vispruner_ranks_like_fastervlm(model, batch, 3, scope="crop")


def test_adaptive_budget_on_images_and_video_frames(onevision, batch):
    from tokensieve import Adaptive

    model, make = onevision
    images = [demo_image(64, 0).resize((32, 20)), demo_image(64, 1).resize((16, 40))]
    frames = [demo_image(32, s) for s in range(3)]
    singles = [
        make(["user : <image> what ? assistant :"], [images[0]]),
        make(["user : <image> <video> what is this ? assistant :"], [images[1]], [frames]),
    ]
    cal, report = assert_adaptive_is_per_set(model, batch, singles, Adaptive(2, 1, 4), scope="crop", method="vispruner")
    video = report.images[-1]
    assert video.frames == 3 and video.tokens_out == len(video.kept_indices) + 1  # the closing newline stays
