"""LLaVA-OneVision images: NeXT's anyres policies on a CLS-free SigLIP tower, multi-image prompts, refusals."""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.errors import UnsupportedModelError
from tokensieve.tiny import demo_image

from tokensieve.adapters.llava_onevision import LlavaOnevisionAdapter

from .families import methods_for, build_tiny_onevision, greedy, logits

SIDE = 4

METHODS = methods_for(LlavaOnevisionAdapter)  # the stages this family supports today


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


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_equals_vanilla(onevision, batch, vanilla, method):
    model, _ = onevision
    ref, ref_gen = vanilla
    with Sieve(method, 1.0)(model):
        got, got_gen = logits(model, batch), greedy(model, batch)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert torch.equal(got_gen, ref_gen)


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


@pytest.mark.parametrize("method", ["evocut", "fastervlm", "visionzip", "pool", "divprune"])
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


def test_in_encoder_methods_are_refused_on_the_cls_free_tower(onevision):
    model, _ = onevision
    before = dict(model.__dict__)
    for method in ("evoprune", "flowcut"):
        with pytest.raises(UnsupportedModelError, match="in-encoder"):
            Sieve(method, 4).apply(model)
    assert model.__dict__.keys() == before.keys()
