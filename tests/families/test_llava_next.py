"""LLaVA-NeXT anyres: per-crop, per-image and global budgets, the newline policy, padded batches of unequal images."""

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokensieve import Sieve
from tokensieve.adapters import get_adapter
from tokensieve.budget import Budget
from tokensieve.errors import BudgetError
from tokensieve.methods import get_method
from tokensieve.models.tiny import demo_image

from ..conftest import prompt
from .builders import build_tiny_llava_next
from .helpers import (
    assert_adaptive_is_per_set,
    assert_unit_cut_equals_pick,
    assert_vispruner_ranks_like_fastervlm,
)
from .helpers import greedy as _gen
from .helpers import logits as _logits

SIDE = 4  # 16 px crops, 4 px patches: 4x4 = 16 patches per crop


@pytest.fixture(scope="module")
def next_model():
    return build_tiny_llava_next()


@pytest.fixture(scope="module")
def batch(next_model):
    """Two images of different shapes (5 and 3 crops, both unpadded), left-padded prompts."""
    _, proc = next_model
    images = [demo_image(64, 0).resize((64, 40)), demo_image(64, 1).resize((30, 64))]
    return proc(
        images=images,
        text=[prompt(proc, "what ?"), prompt(proc, "what is this ?")],
        return_tensors="pt",
        padding=True,
    )


def _crops(model, batch):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    cfg = model.config
    return [
        get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for size in batch["image_sizes"]
    ]


@pytest.fixture(scope="module")
def vanilla(next_model, batch):
    """The uncompressed model's logits and greedy tokens, computed once for every keep-all comparison."""
    model, _ = next_model
    return _logits(model, batch), _gen(model, batch)


@pytest.mark.parametrize("method", ["fastervlm", "vispruner", "evocut", "divprune", "random"])
@pytest.mark.parametrize(
    "budget,scope,expected", [(4, "crop", [20, 12]), (20, "image", [20, 20]), (12, "global", [12, 12])]
)
def test_selected_counts_follow_the_scope(next_model, batch, method, budget, scope, expected):
    model, _ = next_model
    (nph0, npw0), (nph1, npw1) = _crops(model, batch)
    assert (1 + nph0 * npw0, 1 + nph1 * npw1) == (5, 3)
    sieve = Sieve(method, budget, scope=scope)
    with sieve(model):
        out = _gen(model, batch, n=2)
    assert [len(im.kept_indices) for im in sieve.last_report.images] == expected
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    if scope == "crop":  # 4 from each crop, base view included
        for im in sieve.last_report.images:
            per_crop = torch.bincount(torch.tensor(im.kept_indices) // (SIDE * SIDE))
            assert per_crop.tolist() == [4] * len(per_crop)


def _expected_newlines(model, batch, image, kept):
    """Grid rows (across the crop grid) holding at least one kept patch: one newline each."""
    nph, npw = _crops(model, batch)[image]
    rows = set()
    for idx in kept:
        crop, patch = divmod(idx, SIDE * SIDE)
        if crop == 0:
            continue  # the base view has no newlines
        rows.add(((crop - 1) // npw) * SIDE + patch // SIDE)
    return len(rows)


@pytest.mark.parametrize("method", ["fastervlm", "random"])
def test_newline_kept_only_for_rows_that_keep_tokens(next_model, batch, method):
    model, _ = next_model
    adapter = get_adapter(model)
    enc = {k: batch[k] for k in ("pixel_values", "image_sizes")}
    with torch.inference_mode():
        encoded = adapter.encode(get_method(method)(), Budget.parse(2, "crop"), enc)
    newline = model.model.image_newline
    for i, (feats, im) in enumerate(zip(encoded.features, encoded.images)):
        is_nl = (feats == newline).all(dim=-1)
        assert int(is_nl.sum()) == _expected_newlines(model, batch, i, im.kept_indices)
        assert feats.shape[0] == len(im.kept_indices) + int(is_nl.sum())
        assert not bool(is_nl[:2].any())  # the base view's two tokens come first, with no newline


@pytest.mark.parametrize("method", ["fastervlm", "evocut", "divprune", "visionzip"])
@pytest.mark.parametrize("budget,scope", [(2, "crop"), (20, "image"), (12, "global"), (0.3, "image")])
def test_fixed_newline_policies_fix_the_count_before_selection(next_model, batch, method, budget, scope):
    """newlines="all" keeps every row's newline, "none" none: an image's count then follows from its layout and the
    budget alone (tokensieve.engine.anyres.num_tokens, what the vLLM integration gives each image), whichever tokens
    win."""
    from tokensieve.engine import anyres

    model, _ = next_model
    adapter = get_adapter(model)
    packs = adapter._packed({k: batch[k] for k in ("pixel_values", "image_sizes")})
    for policy in ("all", "none"):
        sieve = Sieve(method, budget, scope=scope, newlines=policy)
        with sieve(model):
            _gen(model, batch, n=1)
        for pk, im in zip(packs, sieve.last_report.images):
            want = anyres.num_tokens(pk, Budget.parse(budget, scope), SIDE, SIDE * SIDE, policy)
            assert (
                im.tokens_out
                == want
                == (pk.num_newlines if policy == "all" else 0)
                + sum(anyres.image_shares(pk, Budget.parse(budget, scope), SIDE, SIDE * SIDE))
            )


def test_newline_policies_keep_the_same_tokens_and_differ_only_in_newlines(next_model, batch):
    model, _ = next_model
    adapter = get_adapter(model)
    enc = {k: batch[k] for k in ("pixel_values", "image_sizes")}
    newline = model.model.image_newline
    out = {}
    for policy in ("rows", "all", "none"):
        adapter.newlines = policy
        with torch.inference_mode():
            out[policy] = adapter.encode(get_method("fastervlm")(), Budget.parse(2, "crop"), enc)
    for i in range(2):
        kept = {p: out[p].images[i].kept_indices for p in out}
        assert kept["rows"] == kept["all"] == kept["none"]
        feats = {p: out[p].features[i] for p in out}
        tokens = {p: feats[p][~(feats[p] == newline).all(-1)] for p in out}
        assert torch.equal(tokens["rows"], tokens["all"]) and torch.equal(tokens["rows"], tokens["none"])
        assert int((feats["none"] == newline).all(-1).sum()) == 0
        assert int((feats["all"] == newline).all(-1).sum()) == adapter._packed(enc)[i].num_newlines


def test_keep_all_with_every_newline_equals_vanilla_and_bad_policies_are_refused(next_model, batch, vanilla, tiny):
    from tokensieve.errors import UnsupportedModelError

    model, _ = next_model
    with Sieve("divprune", 1.0, newlines="all")(model):
        torch.testing.assert_close(_logits(model, batch), vanilla[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="newlines must be one of"):
        Sieve("divprune", 4, newlines="some")
    with pytest.raises(UnsupportedModelError, match="LLaVA-NeXT-family"):
        Sieve("divprune", 4, newlines="none").apply(tiny[0])


def test_forward_equals_hand_written_reference(next_model, batch):
    """random at 3 per crop: the same survivors and newlines, built by hand from the model's own packing."""
    model, _ = next_model
    sieve = Sieve("random", 3, scope="crop")
    with sieve(model):
        got = _logits(model, batch)
    base = model.model
    side2 = SIDE * SIDE
    with torch.inference_mode():
        packed = base.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    kept_feats, kept_counts = [], []
    for i, feats in enumerate(packed):
        nph, npw = _crops(model, batch)[i]
        n = 1 + nph * npw
        ids = (torch.arange(n * side2, dtype=torch.float64)).view(n, side2, 1)
        layout, _ = base.pack_image_features([ids], batch["image_sizes"][i : i + 1], "default", torch.tensor([-1.0]))
        layout = layout[0].view(-1).long()
        keep = torch.zeros(layout.numel(), dtype=torch.bool)
        for crop in range(n):
            where = ((layout >= crop * side2) & (layout < (crop + 1) * side2)).nonzero().flatten()
            where = where[layout[where].argsort()]  # raster order inside the crop
            pick = torch.randperm(where.numel(), generator=torch.Generator().manual_seed(0))[:3].sort().values
            keep[where[pick]] = True
        row_has = False
        for p in range(layout.numel()):  # newline of a row with a kept token
            if layout[p] < 0:
                keep[p] = row_has
                row_has = False
            elif layout[p] >= side2 or n == 1:
                row_has = row_has or bool(keep[p])
        kept_feats.append(feats[keep])
        kept_counts.append(int(keep.sum()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    img = model.config.image_token_id
    rows = []
    for b in range(ids.shape[0]):
        pos = (ids[b] == img).nonzero().flatten()
        drop = pos[kept_counts[b] :]
        keep_pos = torch.ones(ids.shape[1], dtype=torch.bool)
        keep_pos[drop] = False
        rows.append(keep_pos.nonzero().flatten())
    length = max(r.numel() for r in rows)
    new_ids = torch.zeros(ids.shape[0], length, dtype=torch.long)
    new_mask = torch.zeros_like(new_ids)
    for b, r in enumerate(rows):
        new_ids[b, length - r.numel() :] = ids[b, r]
        new_mask[b, length - r.numel() :] = mask[b, r]
    with torch.inference_mode():
        ref = model(
            input_ids=new_ids,
            attention_mask=new_mask,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=kept_feats)},
        ).logits
    assert torch.equal(sieve.last_report.input_ids, new_ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ in-encoder


@pytest.fixture(scope="module")
def filled(next_model):
    """Two images whose aspect matches a pinpoint, so unpadding removes nothing (3 crops each)."""
    _, proc = next_model
    images = [demo_image(64, 0).resize((32, 64)), demo_image(64, 3).resize((64, 32))]
    return proc(
        images=images, text=[prompt(proc, "what ?"), prompt(proc, "what is this ?")], return_tensors="pt", padding=True
    )


def test_in_encoder_cut_at_the_last_layer_equals_pre_projector_selection(next_model, filled):
    """Cutting right after the layer that produces the feature layer keeps exactly those rows' features, so the
    in-encoder path (crops batched through CLIP, survivors packed with newlines) must equal the pre-projector
    path selecting the same patches."""
    model, _ = next_model
    assert_unit_cut_equals_pick(
        model, filled, get_adapter(model).feature_layers({})[-1] - 1, [0, 3, 5, 6, 9, 15], "crop"
    )


@pytest.mark.parametrize("method", ["evoprune", "flowcut"])
def test_in_encoder_counts_per_crop(next_model, batch, filled, method):
    model, _ = next_model
    sieve = Sieve(method, 5, scope="crop")
    with sieve(model):
        _gen(model, filled, n=2)
    assert [len(im.kept_indices) for im in sieve.last_report.images] == [
        5 * im.crops for im in sieve.last_report.images
    ]
    if method == "flowcut":  # FlowCut's schedule: the last cut is after layer 1, so layer 2 (features) runs on 5 + CLS
        assert sieve.last_report.encoder_layer_tokens == [SIDE * SIDE + 1, SIDE * SIDE + 1, 6, 0]
    with sieve(model):
        _gen(model, batch, n=2)
    # the encoder sees whole crops: a kept patch that unpadding removes is dropped, so padded crops keep at most 5
    for im in sieve.last_report.images:
        assert len(im.kept_indices) <= 5 * im.crops
    assert sieve.last_report.encoder_layer_tokens[0] == SIDE * SIDE + 1
    if method == "evoprune":  # its cuts start early enough for a later layer of this 4-layer tower to run shorter
        assert min(t for t in sieve.last_report.encoder_layer_tokens if t) < SIDE * SIDE + 1
    with pytest.raises(BudgetError, match="global"):
        with Sieve(method, 5, scope="global")(model):
            _logits(model, filled)


def test_flops_trace_counts_one_encoder_pass_per_crop(next_model, batch):
    from tokensieve.tools.flops import trace_from_report

    model, _ = next_model
    sieve = Sieve("evocut", 0.5)
    with sieve(model):
        _logits(model, batch)
    crops = [int(torch.tensor(c).prod()) + 1 for c in _crops(model, batch)]  # grid crops + the base view
    assert [im.crops for im in sieve.last_report.images] == crops
    assert trace_from_report(sieve.last_report).num_images == sum(crops)


def test_vispruner_important_tokens_use_each_crops_cls(next_model, batch):
    model, _ = next_model
    assert_vispruner_ranks_like_fastervlm(model, batch, 5, scope="crop")


@pytest.mark.parametrize("scope", ["image", "crop", "global"])
def test_adaptive_budget_per_crop_or_per_image(next_model, batch, scope):
    """Scope image: mean, min and max shared over an image's crops, each crop adapting on its own; crop: per crop;
    global: one count per image ranked across its crops."""
    from tokensieve import Adaptive

    model, proc = next_model
    images = [demo_image(64, 0).resize((64, 40)), demo_image(64, 1).resize((30, 64))]
    texts = [prompt(proc, "what ?"), prompt(proc, "what is this ?")]
    singles = [proc(images=[im], text=[t], return_tensors="pt") for im, t in zip(images, texts)]
    budget = Adaptive(6, 2, 12) if scope == "crop" else Adaptive(20, 8, 40)
    cal, report = assert_adaptive_is_per_set(model, batch, singles, budget, scope)
    assert cal.sets == (2 if scope == "global" else 8)
    assert all(1 <= c <= (12 if scope == "crop" else 40) for c in cal.counts)
