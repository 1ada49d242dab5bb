"""Qwen2-VL and Qwen2.5-VL: merge-unit selection, preserved M-RoPE positions, images and videos in one batch."""

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokensieve import Sieve
from tokensieve.adapters import get_adapter
from tokensieve.adapters.qwen_vl import QwenVLAdapter
from tokensieve.errors import BudgetError, PlaceholderError
from tokensieve.methods import get_method
from tokensieve.methods.base import IN_ENCODER
from tokensieve.models.tiny import demo_image
from tokensieve.tools.flops import count_flops, dims_from_config, vanilla_trace

from ..tools.test_flops import counter
from .builders import build_tiny_qwen
from .helpers import (
    CutUnits,
    assert_adaptive_is_per_set,
    assert_unit_cut_equals_pick,
    assert_vispruner_ranks_like_fastervlm,
    methods_for,
)
from .helpers import greedy as _gen
from .helpers import logits as _logits

KINDS = ["qwen2_vl", "qwen2_5_vl"]
# 64 px images -> 8x8 patches -> 4x4 = 16 merge units; the video: 4 frames = 2 temporal patches of 16 units
UNITS = 16

# pre-LLM stages here; in-encoder methods are tested below on an all-64 px batch
METHODS = [m for m in methods_for(QwenVLAdapter) if get_method(m).stage != IN_ENCODER]


@pytest.fixture(scope="module", params=KINDS)
def qwen(request):
    return build_tiny_qwen(request.param)


def _mixed_batch(proc, first_side=96):
    """Left-padded batch of two prompts: one image; a video then an image."""
    frames = [demo_image(64, s) for s in range(4)]
    return proc(
        ["user : <image> what is this ? assistant :", "user : <video> <image> what ? assistant :"],
        images=[demo_image(first_side, 0), demo_image(64, 1)],
        videos=[frames],
    )


@pytest.fixture(scope="module")
def batch(qwen):
    return _mixed_batch(qwen[1])


@pytest.mark.parametrize("method", METHODS)
def test_counts_per_image_and_per_frame(qwen, batch, method):
    model, _ = qwen
    sieve = Sieve(method, 4)
    with sieve(model):
        out = _gen(model, batch, n=2)
    report = sieve.last_report
    # images get 4 each; the video gets 4 per temporal patch (frame) by default
    assert [im.tokens_out for im in report.images] == [4, 4, 8]
    assert [im.sample for im in report.images] == [0, 1, 1]
    real_in = batch["attention_mask"].sum(1).tolist()
    assert [t[0] for t in report.llm_layer_tokens] == [real_in[0] - (UNITS - 4), real_in[1] - (3 * UNITS - 12)]
    assert [t[0] for t in report.llm_layer_visual_tokens] == [4, 12]
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    video = report.images[2]
    assert sum(i < UNITS for i in video.kept_indices) == 4  # four in each frame
    for im in report.images:
        assert im.kept_indices == sorted(set(im.kept_indices))


def test_global_scope_ranks_a_video_as_a_whole(qwen, batch):
    model, _ = qwen
    sieve = Sieve("fastervlm", 6, scope="global")
    with sieve(model):
        _logits(model, batch)
    assert [im.tokens_out for im in sieve.last_report.images] == [6, 6, 6]
    with pytest.raises(BudgetError, match="exceeds the 16 visual tokens"):
        with Sieve("random", UNITS + 1, scope="frame")(model):
            _logits(model, batch)


def _reference_inputs(model, batch, k):
    """What the random method at budget k should hand the LM, written without the adapter."""
    base = model.model
    keep = torch.randperm(UNITS, generator=torch.Generator().manual_seed(0))[:k].sort().values
    with torch.inference_mode():
        img = base.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        vid = base.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"]).pooler_output
        pos3, _ = base.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            video_grid_thw=batch["video_grid_thw"],
            attention_mask=batch["attention_mask"].bool(),
        )
    vid_keep = torch.cat([keep, keep + UNITS])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cfg = model.config
    rows = []
    for b in range(ids.shape[0]):
        keep_pos = torch.ones(ids.shape[1], dtype=torch.bool)
        for token, kept in ((cfg.image_token_id, keep), (cfg.video_token_id, vid_keep)):
            where = (ids[b] == token).nonzero().flatten()
            for start in range(0, where.numel(), UNITS if token == cfg.image_token_id else 2 * UNITS):
                run = where[start : start + (UNITS if token == cfg.image_token_id else 2 * UNITS)]
                drop = torch.ones(run.numel(), dtype=torch.bool)
                drop[kept] = False
                keep_pos[run[drop]] = False
        rows.append(keep_pos.nonzero().flatten())
    length = max(r.numel() for r in rows)
    new_ids = torch.full((ids.shape[0], length), 0)
    new_mask = torch.zeros_like(new_ids)
    new_pos = torch.zeros(3, ids.shape[0], length, dtype=torch.long)
    for b, r in enumerate(rows):  # left padding, as the input
        new_ids[b, length - r.numel() :] = ids[b, r]
        new_mask[b, length - r.numel() :] = mask[b, r]
        new_pos[:, b, length - r.numel() :] = pos3[:, b, r]
    text = (new_mask.cumsum(-1) - 1).clamp(min=0) * new_mask
    feats = {
        "image": BaseModelOutputWithPooling(pooler_output=[f[keep] for f in img]),
        "video": BaseModelOutputWithPooling(pooler_output=[vid[0][vid_keep]]),
    }
    return dict(
        input_ids=new_ids,
        attention_mask=new_mask,
        position_ids=torch.cat([text[None], new_pos]),
        mm_token_type_ids=(new_ids == cfg.image_token_id).long() + 2 * (new_ids == cfg.video_token_id).long(),
        mm_encoder_outputs=feats,
    )


def test_forward_equals_hand_written_reference(qwen, batch):
    model, _ = qwen
    sieve = Sieve("random", 5)
    with sieve(model):
        got = _logits(model, batch)
    ref_inputs = _reference_inputs(model, batch, 5)
    assert torch.equal(sieve.last_report.input_ids, ref_inputs["input_ids"])
    with torch.inference_mode():
        ref = model(**ref_inputs).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_cached_generation_equals_no_cache_recompute(qwen, batch):
    """Decoding continues from the last kept M-RoPE position + 1 (the uncompressed prompt's continuation)."""
    model, _ = qwen
    n = 4
    with Sieve("random", 5)(model):
        out = _gen(model, batch, n=n)
    new = out[:, batch["input_ids"].shape[1] :]
    ref = _reference_inputs(model, batch, 5)
    ids, mask, pos = ref["input_ids"], ref["attention_mask"], ref["position_ids"]
    for step in range(n):
        with torch.inference_mode():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                mm_encoder_outputs=ref["mm_encoder_outputs"],
                use_cache=False,
            ).logits[:, -1]
        assert torch.equal(logits.argmax(-1), new[:, step])
        ids = torch.cat([ids, new[:, step : step + 1]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
    # and that continuation is the uncompressed one: the last text token's position is unchanged by pruning
    full = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        video_grid_thw=batch["video_grid_thw"],
        attention_mask=batch["attention_mask"].bool(),
    )[0]
    assert torch.equal(ref["position_ids"][1:, :, -1], full[:, :, -1])


def test_pool_tokens_sit_at_their_window_centres(qwen):
    model, proc = qwen
    inputs = proc(["user : <image> what ? assistant :"], images=[demo_image(64, 2)])
    sieve = Sieve("pool", 4)
    with sieve(model):
        _logits(model, inputs)
    # a 4x4 unit grid pooled to 2x2: window centres (0,0), (0,2), (2,0), (2,2)
    assert sieve.last_report.images[0].kept_indices == [0, 2, 8, 10]


def test_user_position_ids_are_refused_and_model_untouched(qwen, batch):
    model, _ = qwen
    ref = _logits(model, batch)
    bad = dict(batch, position_ids=torch.zeros(3, *batch["input_ids"].shape, dtype=torch.long))
    with Sieve("random", 4)(model):
        with pytest.raises(PlaceholderError, match="position_ids"):
            _logits(model, bad)
    assert torch.equal(_logits(model, batch), ref)


def test_signals_are_read_in_raster_order(qwen, batch):
    """The ViT runs Qwen2.5-VL's blocks in window order; captured patch rows must come back in processor order."""
    from tokensieve.adapters import get_adapter
    from tokensieve.methods.base import Request

    model, _ = qwen
    adapter = get_adapter(model)
    with torch.inference_mode():
        sig = adapter._run(batch["pixel_values"], batch["image_grid_thw"], Request(hidden_states=(0,)), [], video=False)
        embedded = model.model.visual.patch_embed(batch["pixel_values"])
        reprojected = adapter._project(sig.units_in.reshape(-1, 4 * sig.units_in.shape[-1]))
    torch.testing.assert_close(sig.hidden[0], embedded, rtol=0, atol=0)
    torch.testing.assert_close(reprojected, sig.merged, rtol=0, atol=1e-5)


def test_video_only_and_text_only_calls(qwen):
    model, proc = qwen
    video = proc(["user : <video> what ? assistant :"], videos=[[demo_image(64, s) for s in range(4)]])
    text = proc(["user : what ? assistant :"])
    ref_text = _gen(model, text)
    sieve = Sieve("evocut", 3)
    with sieve(model):
        out = _gen(model, video, n=2)
        report = sieve.last_report
        assert torch.equal(_gen(model, text), ref_text)
    assert [im.tokens_out for im in report.images] == [6]
    assert not sieve.last_report.visual_input  # the text-only call's own report
    assert out.shape[1] == video["input_ids"].shape[1] + 2


def test_every_stage_attaches_and_detaches_cleanly(qwen, batch):
    """Every registered method attaches (no stage or signal is missing on this family) and leaves nothing behind;
    HiPrune's received-attention signal is the per-segment mean the CLS-free fallback already uses."""
    from tokensieve.methods import method_names

    model, _ = qwen
    before = dict(model.__dict__)
    for name in method_names():
        # a 2-layer LM: in-LLM methods prune after layer 1 (pdrop's default quarters do not fit, refused at apply)
        params = {"fastv": {"layer": 1}, "dart": {"layer": 1}, "pdrop": {"layers": (0.5,)}}.get(name, {})
        with Sieve(name, 0.5, **params).apply(model):
            pass
        assert model.__dict__.keys() == before.keys()
    sieve = Sieve("hiprune", 4)
    with sieve(model):
        _logits(model, batch)
    assert [im.tokens_out for im in sieve.last_report.images] == [4, 4, 8]


# ------------------------------------------------------------------------------------------- in-encoder (Qwen2-VL)


@pytest.fixture(scope="module", params=KINDS)
def qwen2(request):
    return build_tiny_qwen(request.param)


@pytest.fixture(scope="module")
def batch2(qwen2):
    return _mixed_batch(qwen2[1], first_side=64)


@pytest.mark.parametrize("method", ["evoprune", "flowcut"])
def test_in_encoder_keep_all_and_counts(qwen2, batch2, method):
    model, _ = qwen2
    want, want_gen = _logits(model, batch2), _gen(model, batch2)
    with Sieve(method, 1.0)(model):
        torch.testing.assert_close(_logits(model, batch2), want, rtol=0, atol=1e-5)
        assert torch.equal(_gen(model, batch2), want_gen)
    for budget, scope, counts in [(4, "image", [4, 4, 8]), (6, "global", [6, 6, 6])]:
        sieve = Sieve(method, budget, scope=scope)
        with sieve(model):
            out = _gen(model, batch2, n=2)
        rep = sieve.last_report
        assert [im.tokens_out for im in rep.images] == counts
        if method == "flowcut":  # the last cut is before the last block, which produces the merger's input
            assert rep.encoder_layer_tokens[-1] < rep.encoder_layer_tokens[-2]
        assert (rep.input_ids == model.config.image_token_id).sum() + (
            rep.input_ids == model.config.video_token_id
        ).sum() == sum(counts)
        assert torch.equal(out[:, : batch2["input_ids"].shape[1]], batch2["input_ids"])
        if scope == "image":
            assert sum(i < UNITS for i in rep.images[2].kept_indices) == 4  # four in each temporal patch


def test_in_encoder_cut_after_the_last_block_equals_pre_projector_selection(qwen2, batch2):
    """After the last block the kept units' rows are the full run's rows, so the merger must give exactly the
    pre-projector path's tokens for the same units (and the LM the same logits)."""
    model, _ = qwen2
    assert_unit_cut_equals_pick(model, batch2, 3, [0, 3, 5, 10, 15], "frame")


def test_in_encoder_cuts_shorten_later_blocks_and_merges_replay_on_patch_rows(qwen2, batch2):
    """A cut after block 1: blocks 2-3 run on the kept units only, with cu_seqlens and the rotary cut to match
    (checked against a hand-run of the remaining blocks); a merge needs ``groups``."""
    model, _ = qwen2
    vis = model.model.visual
    units = [1, 2, 6, 9, 12, 14]
    captured = {}

    def keep(name, value):
        captured.setdefault(name, value)

    # what block 2 receives, and (seen by each attention, after the sieve's own block hook) the cu_seqlens and
    # rotary blocks 2 and 3 run with; the first visual forward is the two images' (videos run after them)
    hooks = [
        vis.blocks[2].register_forward_pre_hook(
            lambda m, a, k: keep("hs", a[0] if a else k["hidden_states"]), with_kwargs=True
        ),
        vis.merger.register_forward_pre_hook(lambda m, a: keep("merger_in", a[0])),
    ] + [
        vis.blocks[i].attn.register_forward_pre_hook(
            lambda m, a, k, _i=i: keep(_i, (k["cu_seqlens"], k["position_embeddings"])), with_kwargs=True
        )
        for i in (2, 3)
    ]
    sieve = Sieve(CutUnits(1, units, merge=True), len(units), scope="frame")
    try:
        with sieve(model):
            _logits(model, batch2)
    finally:
        for h in hooks:
            h.remove()
    assert sieve.last_report.encoder_layer_tokens[0] > sieve.last_report.encoder_layer_tokens[2]
    cu, pe = captured[3]  # block 3 attends over whole images on both classes: 2 segments of 6 units x 4 patches
    assert cu.tolist() == [0, 24, 48]
    x = captured["hs"]
    assert x.shape[0] == 2 * 6 * 4
    with torch.inference_mode():  # blocks 2-3 by hand, each with what it was given
        for i in (2, 3):
            x = vis.blocks[i](x, cu_seqlens=captured[i][0], position_embeddings=captured[i][1])
    torch.testing.assert_close(x, captured["merger_in"])
    # the rotary of the kept rows is the full run's, gathered at their rows of the ViT's (window) order
    full = {}
    h = vis.blocks[0].attn.register_forward_pre_hook(
        lambda m, a, k: full.update(pe=full.get("pe", k["position_embeddings"])), with_kwargs=True
    )
    try:
        _logits(model, batch2)
    finally:
        h.remove()
    order = get_adapter(model)._unwindow(batch2["image_grid_thw"])
    patches = (torch.tensor(units)[:, None] * 4 + torch.arange(4)).flatten()  # of image 0
    rows = (patches if order is None else order.argsort()[patches]).sort().values
    torch.testing.assert_close(pe[0][:24], full["pe"][0][rows])
    assert sum(im.merged for im in sieve.last_report.images) > 0
    with pytest.raises(ValueError, match="groups"):
        with Sieve(CutUnits(1, units, merge=True, tell=False), len(units), scope="frame")(model):
            _logits(model, batch2)


def test_vispruner_important_tokens_use_the_cls_free_fallback(qwen, batch):
    """Images and video frames: VisPruner's important half is FasterVLM's received-attention ranking."""
    model, _ = qwen
    assert_vispruner_ranks_like_fastervlm(model, batch, 6)


@pytest.mark.parametrize("method", ["evocut", "vispruner", "divprune"])
def test_adaptive_budget_per_image_and_per_frame(qwen, batch, method):
    from tokensieve import Adaptive

    model, proc = qwen
    frames = [demo_image(64, s) for s in range(4)]
    singles = [
        proc(["user : <image> what is this ? assistant :"], images=[demo_image(96, 0)]),
        proc(["user : <video> <image> what ? assistant :"], images=[demo_image(64, 1)], videos=[frames]),
    ]
    cal, report = assert_adaptive_is_per_set(model, batch, singles, Adaptive(6, 2, 12), method=method)
    assert cal.sets == 4  # two images and the video's two temporal patches
    assert all(2 <= c <= 12 for c in cal.counts)


def test_qwen_images_are_priced_at_their_own_grid():
    """Two images of different resolutions: the vision cost follows each one's image_grid_thw, not the config."""

    def generate_flops(model, batch):
        with torch.inference_mode(), counter() as fc:
            model.generate(**batch, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        return fc.get_total_flops()

    model, proc = build_tiny_qwen("qwen2_vl")
    small = proc(["user : <image> what ? assistant :"], images=[demo_image(32, 0)])
    large = proc(["user : <image> what ? assistant :"], images=[demo_image(96, 0)])
    costs = []
    for batch in (small, large):
        trace = vanilla_trace(model.config, **batch)
        costs.append(count_flops(model.config, trace))
        assert costs[-1].total == generate_flops(model, batch)
        assert trace.projected_tokens == int(batch["image_grid_thw"].prod()) // 4
    assert costs[1].vision > 4 * costs[0].vision
    assert dims_from_config(model.config).image_tokens is None  # no per-config image size to fall back to
