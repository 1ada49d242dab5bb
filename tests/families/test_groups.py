"""Every merging method reports its merge groups (``ImageReport.groups``) on every family where it runs.

``groups`` holds, per cell of an entry's report grid, an id of the output token the cell went into (-1: dropped);
``tokensieve show`` draws them. Merging methods: EvoPrune (in the encoder), VisionZip (contextual tokens) and pool
(every token created); keep-or-drop methods report ``None``.
"""

from collections import Counter

import pytest
import torch

from tokensieve import Sieve
from tokensieve.models.tiny import demo_image

from ..conftest import prompt
from . import builders as F

MERGING = ["evoprune", "visionzip", "pool"]
FAMILIES = ["llava15", "llava_next", "llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3"]


def _build(name):
    """``(model, inputs)``: one prompt with an image, and a video where the family takes videos."""
    img = demo_image(64, 0)
    if name == "llava15":
        from tokensieve.models.tiny import build_tiny_llava

        model, proc = build_tiny_llava(image_size=32, patch_size=4, vision_layers=6, text_layers=2)
        return model, proc(images=[img], text=[prompt(proc, "what ?")], return_tensors="pt")
    if name == "llava_next":
        model, proc = F.build_tiny_llava_next()
        return model, proc(images=[img.resize((64, 40))], text=[prompt(proc, "what ?")], return_tensors="pt")
    if name in ("llava_next_video", "llava_onevision"):
        build = F.build_tiny_llava_next_video if name == "llava_next_video" else F.build_tiny_onevision
        model, make = build()
        frames = [demo_image(32, s) for s in range(2)]
        return model, make(["user : <video> <image> what ? assistant :"], [img.resize((32, 20))], [frames])
    if name.startswith("qwen"):
        model, proc = F.build_tiny_qwen(name)
        return model, proc(
            ["user : <video> <image> what ? assistant :"], images=[img], videos=[[demo_image(64, s) for s in range(4)]]
        )
    model, proc = F.build_tiny_idefics3()
    return model, proc(images=[[img]], text=[prompt(proc, "what ?")], return_tensors="pt")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return (request.param, *_build(request.param))


def _run(model, inputs, method):
    sieve = Sieve(method, 0.5)
    with sieve(model), torch.inference_mode():
        model(**inputs)
    return sieve.last_report


@pytest.mark.parametrize("method", MERGING)
def test_merging_methods_report_their_groups(family, method):
    name, model, inputs = family
    report = _run(model, inputs, method)
    assert report.images
    for im in report.images:
        assert im.groups is not None, (name, method, im.image)
        assert len(im.groups) == im.grid[0] * im.grid[1]
        members = Counter(g for g in im.groups if g >= 0)
        assert all(im.groups[c] >= 0 for c in im.kept_indices)  # a kept position stands for its own token
        assert 0 < len(members) <= im.tokens_out
        assert any(n > 1 for n in members.values()), "a 2x smaller entry must have merged something"
        if method == "evoprune":  # a merged row is one that absorbed other patches (units, windows)
            assert sum(n > 1 for n in members.values()) == im.merged
        if method == "pool":  # every token is a window average; windows do not overlap
            assert len(members) == im.merged


def test_keep_or_drop_methods_report_no_groups(family):
    _, model, inputs = family
    assert all(im.groups is None for im in _run(model, inputs, "divprune").images)
    report = _run(model, inputs, Sieve("evoprune", 0.5, merge=False).method)
    assert all(im.groups is None for im in report.images)
