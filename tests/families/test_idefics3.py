"""Idefics3 / SmolVLM: crops as separate runs, pixel-shuffle candidates, padded images and crops in a batch."""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.adapters import get_adapter
from tokensieve.budget import Budget
from tokensieve.errors import BudgetError, PlaceholderError, UnsupportedModelError
from tokensieve.methods import get_method
from tokensieve.methods.base import Layout, Signals
from tokensieve.models.tiny import demo_image

from ..conftest import prompt
from .builders import build_tiny_idefics3
from .helpers import (
    assert_adaptive_is_per_set,
    assert_unit_cut_equals_pick,
    assert_vispruner_ranks_like_fastervlm,
)
from .helpers import greedy as _gen
from .helpers import logits as _logits

PER_CROP = 16


@pytest.fixture(scope="module")
def idf():
    return build_tiny_idefics3()


@pytest.fixture(scope="module")
def batch(idf):
    """Sample 0: a split image (4 crops + global) and a small one; sample 1: one small image (padding image added)."""
    _, proc = idf
    big, small = demo_image(64, 0).resize((60, 40)), demo_image(64, 1).resize((64, 20))
    return proc(
        images=[[big, small], [small]],
        text=[prompt(proc, "what ?", 2), prompt(proc, "what is this ?")],
        return_tensors="pt",
        padding=True,
    )


@pytest.fixture(scope="module")
def vanilla(idf, batch):
    model, _ = idf
    return _logits(model, batch), _gen(model, batch)


def _crops_per_image(model, batch):
    adapter = get_adapter(model)
    enc = {k: batch[k] for k in ("pixel_values", "pixel_attention_mask")}
    spans = adapter.find_spans(batch["input_ids"], enc)
    return torch.bincount(torch.tensor([s.group for s in spans])).tolist()


def test_layout_of_the_batch(idf, batch):
    model, _ = idf
    assert batch["pixel_values"].shape[1] >= 2
    crops = _crops_per_image(model, batch)
    assert crops == [5, 3, 3]  # padding image dropped, images told apart from input_ids
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == PER_CROP * sum(crops)


@pytest.mark.parametrize("method", ["fastervlm", "vispruner", "divprune", "pool"])
@pytest.mark.parametrize("budget,scope", [(3, "crop"), (7, "image"), (0.25, "image"), (7, "global"), (0.25, "global")])
def test_kept_counts_follow_the_scope(idf, batch, method, budget, scope):
    model, _ = idf
    crops = _crops_per_image(model, batch)
    sieve = Sieve(method, budget, scope=scope)
    with sieve(model):
        _logits(model, batch)
    kept = [len(im.kept_indices) for im in sieve.last_report.images]
    if scope == "global":  # k per image, ranked across its crops: only the image's total is fixed
        bounds = torch.tensor([0] + crops).cumsum(0).tolist()
        per_image = [sum(kept[a:b]) for a, b in zip(bounds, bounds[1:])]
        want_totals = [budget if isinstance(budget, int) else round(budget * PER_CROP * c) for c in crops]
        if method != "pool":
            assert per_image == want_totals
        want = kept
    elif isinstance(budget, float):
        want = [4] * sum(crops)
    elif scope == "crop":
        want = [budget] * sum(crops)
    else:
        want = []
        for c in crops:
            want += [budget // c + (1 if j < budget % c else 0) for j in range(c)]
    if method != "pool":  # pool keeps whole windows, its count is the window grid's
        assert kept == want
    n_out = (sieve.last_report.input_ids == model.config.image_token_id).sum().item()
    assert n_out == sum(im.tokens_out for im in sieve.last_report.images)


def test_forward_equals_hand_written_reference(idf, batch):
    """random at 5 per crop: drop the same connector tokens from the model's own features, by hand."""
    model, _ = idf
    sieve = Sieve("random", 5, scope="crop")
    with sieve(model):
        got = _logits(model, batch)
    rep = sieve.last_report
    with torch.inference_mode():
        feats = model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
        feats = torch.cat(list(feats)).view(-1, PER_CROP, feats[0].shape[-1])
        kept = torch.cat([feats[c, im.kept_indices] for c, im in enumerate(rep.images)])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        is_img = ids == model.config.image_token_id
        rows, masks = [], []
        for b in range(ids.shape[0]):
            keep = torch.ones(ids.shape[1], dtype=torch.bool)
            pos = is_img[b].nonzero().flatten()
            spans = [im for im in rep.images if im.sample == b]
            start = 0
            for im in spans:
                run = pos[start : start + PER_CROP]
                drop = torch.ones(PER_CROP, dtype=torch.bool)
                drop[im.kept_indices] = False
                keep[run[drop]] = False
                start += PER_CROP
            rows.append(ids[b, keep])
            masks.append(mask[b, keep])
        width = max(len(r) for r in rows)
        pad = model.generation_config.pad_token_id
        new_ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
        new_mask = torch.stack([torch.cat([torch.zeros(width - len(m), dtype=m.dtype), m]) for m in masks])
        embeds = model.model.text_model.get_input_embeddings()(new_ids)
        embeds[new_ids == model.config.image_token_id] = kept
        pos_ids = (new_mask.cumsum(-1) - 1).clamp(min=0)
        ref = model(inputs_embeds=embeds, attention_mask=new_mask, position_ids=pos_ids).logits
    assert got.shape[1] == width
    real = new_mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-4)


def test_global_scope_ranks_the_crops_of_an_image_together(idf, batch, vanilla):
    """divprune with scope global: one max-min selection over all crops of an image, split back by crop."""
    model, _ = idf
    crops = _crops_per_image(model, batch)
    sieve = Sieve("divprune", 9, scope="global")
    with sieve(model):
        _logits(model, batch)
    rep = sieve.last_report
    with torch.inference_mode():
        feats = model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
        feats = torch.cat(list(feats)).view(-1, PER_CROP, feats[0].shape[-1])
    start = 0
    for c in crops:
        cat = feats[start : start + c].reshape(1, c * PER_CROP, -1)
        want = get_method("divprune")().select(
            Signals(features=cat, layout=Layout((4 * c, 4), 0), num_layers=2, feature_layer=2), 9
        )
        got = torch.cat(
            [
                torch.tensor(im.kept_indices, dtype=torch.long) + j * PER_CROP
                for j, im in enumerate(rep.images[start : start + c])
            ]
        )
        assert torch.equal(got, want.indices[0].cpu())
        start += c
    assert len({im.tokens_out for im in rep.images}) > 1  # crops keep unequal shares
    with Sieve("divprune", 1.0, scope="global")(model):
        torch.testing.assert_close(_logits(model, batch), vanilla[0], rtol=0, atol=1e-5)
    few = Sieve("divprune", 2, scope="global")  # five crops, two tokens: some crops keep nothing at all
    with few(model):
        out = _gen(model, batch, n=2)
    assert 0 in [im.tokens_out for im in few.last_report.images]
    assert (few.last_report.input_ids == model.config.image_token_id).sum().item() == 2 * len(crops)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_refusals(idf, batch):
    model, _ = idf
    adapter = get_adapter(model)
    enc = {k: batch[k] for k in ("pixel_values", "pixel_attention_mask")}
    spans = adapter.find_spans(batch["input_ids"], enc)
    with torch.inference_mode():
        adapter.encode(get_method("random")(), Budget.parse(7, "image"), enc, spans)
        with pytest.raises(PlaceholderError, match="which crops form an image"):  # grouping is per call
            adapter.encode(get_method("random")(), Budget.parse(7, "image"), enc)
    with pytest.raises(Exception, match="scope"):
        with Sieve("random", 4, scope="frame")(model):
            pass


def test_fastervlm_fallback_matches_eager_attention_with_padded_crops(idf):
    """No CLS: the score is the attention each patch receives from the real queries of its crop, averaged over
    heads and over each shuffle group; checked against the eager maps of the model's own masked encoder."""
    model, proc = idf
    # this processor resizes every crop to a full square, but the model accepts crops with padded pixels (the
    # Idefics2-style processors make them): pad the right 12 px of sample 1's crop by hand
    images = [[demo_image(64, 2)], [demo_image(64, 3)]]
    batch = proc(
        images=images,
        text=[prompt(proc, "what ?"), prompt(proc, "what is it ?")],
        return_tensors="pt",
        padding=True,
        do_image_splitting=False,
    )
    batch["pixel_values"][1, 0, :, :, 20:] = 0.0
    batch["pixel_attention_mask"][1, 0, :, 20:] = 0
    sieve = Sieve("fastervlm", 3, scope="crop")
    with sieve(model):
        _logits(model, batch)
    eager, _ = build_tiny_idefics3()
    eager.model.vision_model.set_attn_implementation("eager")
    pv, pam = batch["pixel_values"], batch["pixel_attention_mask"]
    real_crop = pv.flatten(2).ne(0).any(-1).flatten()
    mask = pam.flatten(0, 1)[real_crop].view(-1, 8, 4, 8, 4).any(4).any(2).flatten(1)  # [crops, 64] real patches
    assert not bool(mask.all())  # the batch really has padded patches
    with torch.inference_mode():
        att = eager.model.get_image_features(pv, pam, output_attentions=True).attentions[-1]  # [crops, H, 64, 64]
    received = (att * mask[:, None, :, None]).sum(2) / mask.sum(-1)[:, None, None]
    scores = received.mean(1)
    groups = get_adapter(model).groups
    pooled = scores[:, groups].mean(-1)
    expected = pooled.topk(3, dim=-1).indices.sort(dim=-1).values
    got = torch.tensor([im.kept_indices for im in sieve.last_report.images])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["fastervlm", "divprune"])
def test_smolvlm_class_keep_all_and_counts(batch, method):
    """SmolVLMForConditionalGeneration is its own class in transformers 5.x with the same connector and layout."""
    model, _ = build_tiny_idefics3(smolvlm=True)
    assert type(model).__name__ == "SmolVLMForConditionalGeneration"
    ref = _logits(model, batch)
    with Sieve(method, 1.0)(model):
        got = _logits(model, batch)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    sieve = Sieve(method, 7, scope="image")
    with sieve(model):
        _logits(model, batch)
    assert [len(im.kept_indices) for im in sieve.last_report.images] == [2, 2, 1, 1, 1, 3, 2, 2, 3, 2, 2]


# ------------------------------------------------------------------------------------------------ in-encoder


@pytest.fixture(scope="module")
def idf_deep():
    """Four vision layers, so a cut can happen with layers still to run after it."""
    return build_tiny_idefics3(vision_layers=4)


def test_in_encoder_cut_after_the_last_layer_equals_pre_projector_selection(idf_deep, batch):
    """After the last layer the kept groups' rows are the full run's, so the connector must give exactly the
    pre-projector path's tokens for the same groups."""

    model, _ = idf_deep
    groups = [0, 5, 6, 11, 15]
    report = assert_unit_cut_equals_pick(model, batch, 3, groups, "crop")
    assert all(im.kept_indices == groups for im in report.images)


@pytest.mark.parametrize("method", ["evoprune", "flowcut"])
def test_in_encoder_counts_and_refusals(idf_deep, batch, method):
    model, _ = idf_deep
    crops = _crops_per_image(model, batch)
    for budget, scope in [(3, "crop"), (7, "image")]:
        sieve = Sieve(method, budget, scope=scope)
        with sieve(model):
            out = _gen(model, batch, n=2)
        kept = [im.tokens_out for im in sieve.last_report.images]
        if scope == "crop":
            assert kept == [3] * sum(crops)
            if method == "flowcut":  # the last layer produces the features: it runs on 3 groups of 4 patches
                assert sieve.last_report.encoder_layer_tokens[-1] == 3 * 4
        else:
            bounds = torch.tensor([0] + crops).cumsum(0).tolist()
            assert [sum(kept[a:b]) for a, b in zip(bounds, bounds[1:])] == [7] * len(crops)
        assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    if method == "evoprune":  # cuts early: later layers run on fewer rows
        assert sieve.last_report.encoder_layer_tokens[-1] < sieve.last_report.encoder_layer_tokens[0]
    with pytest.raises(BudgetError, match="global"):
        with Sieve(method, 5, scope="global")(model):
            _logits(model, batch)
    padded = dict(batch, pixel_attention_mask=batch["pixel_attention_mask"].clone())
    padded["pixel_attention_mask"][0, 0, :, -4:] = 0  # the right edge of a real crop is padding
    with pytest.raises(UnsupportedModelError, match="padded pixels"):
        with Sieve(method, 5, scope="crop")(model):
            _logits(model, padded)


def test_vispruner_important_tokens_use_the_cls_free_fallback(idf, batch):
    model, _ = idf
    assert_vispruner_ranks_like_fastervlm(model, batch, 6, scope="crop")


def test_adaptive_budget_shared_over_crops(idf, batch):
    from tokensieve import Adaptive

    model, proc = idf
    big, small = demo_image(64, 0).resize((60, 40)), demo_image(64, 1).resize((64, 20))
    singles = [
        proc(images=[[big, small]], text=[prompt(proc, "what ?", 2)], return_tensors="pt"),
        proc(images=[[small]], text=[prompt(proc, "what is this ?")], return_tensors="pt"),
    ]
    cal, report = assert_adaptive_is_per_set(model, batch, singles, Adaptive(0.25, 0.1, 0.6), method="divprune")
    assert cal.sets == len(report.images)
    assert all(2 <= c <= 10 for c in cal.counts)  # 16-token crops: round(0.1 * 16) .. round(0.6 * 16)
