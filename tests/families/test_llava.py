"""End-to-end behaviour of sieved LLaVA calls on a tiny random-weight model."""

import copy

import pytest
import torch

import tokensieve
from tokensieve import Sieve
from tokensieve.methods import get_method, method_names
from tokensieve.methods.base import IN_ENCODER, IN_LLM, POST_PROJECTOR, Layout, Signals

from ..conftest import N_TOKENS, batch_and_singles, prompt
from .conformance import assert_same as _assert_same
from .conformance import snapshot as _snapshot  # hooks but transformers' own output-capturing ones
from .helpers import assert_vispruner_ranks_like_fastervlm

ALL = [n for n in method_names() if get_method(n).stage != IN_LLM]  # in-LLM methods: tests/engine/test_llm_stage.py
# in-encoder methods have their own hand-written reference in tests/engine/test_encoder_stage.py
AFTER_ENCODER = [m for m in ALL if get_method(m).stage != IN_ENCODER]


def logits(model, inputs):
    with torch.inference_mode():
        return model(**inputs).logits


def generate(model, inputs, n=5):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("budget,expected", [(16, 16), (0.25, 16), (5, 5)])
def test_kept_count_and_generate(tiny, single, method, budget, expected):
    model, _ = tiny
    sieve = Sieve(method, budget)
    with sieve(model):
        out = generate(model, single, n=4)
        report = sieve.last_report
    assert out.shape == (1, single["input_ids"].shape[1] + 4)
    # the caller's prompt is handed back unchanged in front of the answer
    assert torch.equal(out[:, : single["input_ids"].shape[1]], single["input_ids"])
    (im,) = report.images
    assert im.tokens_in == N_TOKENS and im.tokens_out == expected
    assert report.seq_len_out == report.seq_len_in - (N_TOKENS - expected)
    kept = im.kept_indices
    assert kept == sorted(set(kept)) and all(0 <= i < N_TOKENS for i in kept)
    if im.merged == 0:
        assert len(kept) == expected
    assert report.selection_s >= 0 and report.encode_s >= report.selection_s


def _reference_signals(eager_model, pixel_values, request, features):
    """Signals computed the slow, obvious way: full hidden states and eager attention maps."""
    tower = eager_model.model.vision_tower
    with torch.inference_mode():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    hs, att = out.hidden_states, out.attentions
    num_layers = len(tower.encoder.layers)
    fl = eager_model.config.vision_feature_layer % (num_layers + 1)
    keys = {}
    for layer in request.keys:
        mod = tower.encoder.layers[layer]
        with torch.inference_mode():
            k = mod.self_attn.k_proj(mod.layer_norm1(hs[layer]))
        b, t, _ = k.shape
        keys[layer] = k.view(b, t, mod.self_attn.num_heads, -1).transpose(1, 2)[:, :, 1:]
    return Signals(
        features=features,
        layout=Layout((8, 8)),
        num_layers=num_layers,
        feature_layer=fl,
        hidden_states={i: hs[i][:, 1:] for i in request.hidden_states},
        attention_received={i: att[i].mean(dim=(1, 2))[:, 1:] for i in request.attention_received},
        cls_attention={i: att[i][:, :, 0, 1:] for i in request.cls_attention},
        keys=keys,
        cls_hidden=hs[fl][:, 0] if request.cls_hidden else None,
    )


@pytest.mark.parametrize("method", AFTER_ENCODER)
def test_matches_hand_written_reference(tiny, tiny_eager, single, method):
    """Sieved forward == embed, scatter the kept projected features by hand, run the LM."""
    model, _ = tiny
    eager, _ = tiny_eager
    k = 12
    sieve = Sieve(method, k)
    with sieve(model):
        got = logits(model, single)

    base = model.model
    pv = single["pixel_values"]
    m = get_method(method)()
    with torch.inference_mode():
        hs = base.vision_tower(pv, output_hidden_states=True).hidden_states
        feats = hs[-2][:, 1:]
        if m.stage == POST_PROJECTOR:
            projected = base.multi_modal_projector(feats)
            sig = _reference_signals(eager, pv, m.request(6, 5), projected)
            kept = m.select(sig, k).output(projected)
        else:
            sig = _reference_signals(eager, pv, m.request(6, 5), feats)
            kept = base.multi_modal_projector(m.select(sig, k).output(feats))
        ids = single["input_ids"][0]
        img = model.config.image_token_id
        pos = (ids == img).nonzero().flatten()
        new_ids = torch.cat([ids[: pos[0]], ids[pos[:k]], ids[pos[-1] + 1 :]])[None]
        emb = base.get_input_embeddings()(new_ids)
        emb[0, pos[0] : pos[0] + kept.shape[1]] = kept[0]
        hidden = base.language_model(inputs_embeds=emb, attention_mask=torch.ones_like(new_ids)).last_hidden_state
        ref = model.lm_head(hidden)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


# left padding with evocut, divprune, visionzip, evoprune and right padding with evocut: on every family in
# tests/families/test_conformance_outputs.py; here the other methods and sides on LLaVA-1.5
@pytest.mark.parametrize(
    "method,padding_side",
    [(m, "left") for m in ("vispruner", "flowcut")]
    + [(m, "right") for m in ("visionzip", "vispruner", "divprune", "evoprune", "flowcut")],
)
def test_batch_with_padding_equals_single_calls(tiny, images, method, padding_side):
    model, processor = tiny
    texts = [prompt(processor, "what is in the picture ?"), prompt(processor, "how many cats are on the couch ?")]
    processor.tokenizer.padding_side = padding_side
    try:
        batch = processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
        singles = [processor(images=[images[i]], text=[texts[i]], return_tensors="pt") for i in range(2)]
    finally:
        processor.tokenizer.padding_side = "left"
    assert (batch["attention_mask"] == 0).any(), "the two prompts should need padding"
    sieve = Sieve(method, 10)
    batch_logits, batch_report, single_logits, single_reports = batch_and_singles(model, sieve, batch, singles)
    mask = batch_report.attention_mask.bool()
    for b in range(2):
        assert batch_report.images[b].kept_indices == single_reports[b].images[0].kept_indices
        assert batch_report.images[b].sample == b
        torch.testing.assert_close(batch_logits[b][mask[b]], single_logits[b][0], atol=1e-5, rtol=1e-4)
    # generation runs on a left-padded shrunk batch whatever the caller's side; answers match the single calls
    with sieve(model):
        out = generate(model, batch, n=4)
        outs = [generate(model, s, n=4) for s in singles]
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    for b in range(2):
        assert torch.equal(out[b, -4:], outs[b][0, -4:])


def test_several_images_per_prompt_and_uneven_batch(tiny, images):
    model, processor = tiny
    two = prompt(processor, "what is left of the cat ?", n_images=2)
    one = prompt(processor, "what is in the picture ?")
    batch = processor(images=images[:3], text=[two, one], return_tensors="pt", padding=True)
    sieve = Sieve("evocut", 8)
    with sieve(model):
        batch_logits = logits(model, batch)
        report = sieve.last_report
        s0 = processor(images=images[:2], text=[two], return_tensors="pt")
        l0 = logits(model, s0)
        r0 = sieve.last_report
        s1 = processor(images=images[2:], text=[one], return_tensors="pt")
        l1 = logits(model, s1)
    assert [im.sample for im in report.images] == [0, 0, 1]
    assert [im.tokens_out for im in report.images] == [8, 8, 8]
    assert [im.kept_indices for im in report.images[:2]] == [im.kept_indices for im in r0.images]
    # sample 0 lost 2 * 56 placeholders, sample 1 only 56: the batch was re-padded on the left
    mask = report.attention_mask.bool()
    assert int(mask[0].sum()) == s0["input_ids"].shape[1] - 2 * (N_TOKENS - 8)
    assert int(mask[1].sum()) == s1["input_ids"].shape[1] - (N_TOKENS - 8)
    assert bool(s0["attention_mask"].all()), "the two-image prompt is the longest: the processor did not pad it"
    assert not mask[0, 0] and mask[0, -1], "sample 0 shrank most, so it is the one re-padded, on the left"
    torch.testing.assert_close(batch_logits[0][mask[0]], l0[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch_logits[1][mask[1]], l1[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ALL)
def test_sdpa_and_eager_select_the_same_tokens(tiny, tiny_eager, images, method):
    (sdpa, processor), (eager, _) = tiny, tiny_eager
    assert sdpa.config.vision_config._attn_implementation == "sdpa"
    assert eager.config.vision_config._attn_implementation == "eager"
    batch = processor(images=images[:2], text=[prompt(processor, "what is this ?")] * 2, return_tensors="pt")
    kept = []
    for model in (sdpa, eager):
        sieve = Sieve(method, 12)
        with sieve(model):
            logits(model, batch)
        kept.append([im.kept_indices for im in sieve.last_report.images])
    assert kept[0] == kept[1]


def test_context_restores_model_even_when_the_call_raises(tiny, single):
    model, _ = tiny
    before = _snapshot(model)
    ref = logits(model, single)
    sieve = Sieve("fastervlm", 8)
    with pytest.raises(RuntimeError, match="boom"):
        with sieve(model) as handle:
            assert "generate" in model.__dict__
            logits(model, single)
            raise RuntimeError("boom")
    assert not handle.active
    _assert_same(before, _snapshot(model))
    # an error raised inside the sieved call itself
    bad = dict(single)
    bad["pixel_values"] = single["pixel_values"].clone()
    bad["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(tokensieve.NonFiniteFeaturesError, match="NaN"):
        with Sieve("evocut", 8)(model):
            model.generate(**bad, max_new_tokens=2)
    _assert_same(before, _snapshot(model))
    assert torch.equal(logits(model, single), ref)
    handle = Sieve("evocut", 8).apply(model)
    handle.remove()
    handle.remove()  # idempotent
    _assert_same(before, _snapshot(model))


def test_vanilla_and_sieved_side_by_side(tiny, single):
    model, _ = tiny
    twin = copy.deepcopy(model)
    ref = logits(twin, single)
    with Sieve("evocut", 8)(model):
        sieved = logits(model, single)
        vanilla = logits(twin, single)
    assert torch.equal(vanilla, ref)
    assert sieved.shape[1] == ref.shape[1] - (N_TOKENS - 8)


def test_forward_carries_labels_along(tiny, single):
    model, _ = tiny
    labels = single["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    sieve = Sieve("evocut", 8)
    with sieve(model), torch.inference_mode():
        out = model(**single, labels=labels)
    assert out.logits.shape[1] == single["input_ids"].shape[1] - (N_TOKENS - 8)
    assert torch.isfinite(out.loss)


def test_evocut_is_deterministic_across_runs(tiny, images):
    model, processor = tiny
    batch = processor(images=images, text=[prompt(processor, "what is this ?")] * 3, return_tensors="pt")
    runs = []
    for _ in range(2):
        sieve = Sieve("evocut", 10)
        with sieve(model):
            out = logits(model, batch)
        runs.append(([im.kept_indices for im in sieve.last_report.images], out))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0][0] != runs[0][0][1], "different images should keep different tokens"


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget,error,match",
    [
        (0, tokensieve.BudgetError, "at least one token"),
        (-3, tokensieve.BudgetError, "at least one token"),
        (1.5, tokensieve.BudgetError, r"\(0, 1\]"),
        (0.0, tokensieve.BudgetError, r"\(0, 1\]"),
        (float("nan"), tokensieve.BudgetError, r"\(0, 1\]"),
        ("64", tokensieve.BudgetTypeError, "int .* or a float"),
        (None, tokensieve.BudgetTypeError, "NoneType"),
        (True, tokensieve.BudgetTypeError, "bool"),
    ],
)
def test_bad_budget(budget, error, match):
    with pytest.raises(error, match=match):
        Sieve("evocut", budget)


def test_budget_larger_than_the_image_fails_before_touching_the_model(tiny, single):
    model, _ = tiny
    before = _snapshot(model)
    with pytest.raises(tokensieve.BudgetError, match=f"exceeds the {N_TOKENS} visual tokens"):
        Sieve("evocut", N_TOKENS + 1).apply(model)
    with pytest.raises(tokensieve.BudgetError, match="scope 'frame'"):
        Sieve("evocut", 8, scope="frame").apply(model)
    _assert_same(before, _snapshot(model))


def test_unknown_method_and_parameters():
    with pytest.raises(tokensieve.UnknownMethodError, match="unknown method 'evocutt'.*evocut"):
        Sieve("evocutt", 8)
    with pytest.raises(TypeError, match="bad parameter for method 'evocut'"):
        Sieve("evocut", 8, clusters=3)


def test_unsupported_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=32,
        )
    )
    with pytest.raises(tokensieve.UnsupportedModelError, match="LlamaForCausalLM is not supported.*Llava"):
        Sieve("evocut", 8).apply(lm)
    assert not lm._forward_pre_hooks and "generate" not in lm.__dict__


def test_llava_with_a_cls_free_tower_is_refused():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        text_config=LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=32,
        ),
        image_token_id=5,
    )
    model = LlavaForConditionalGeneration(cfg)
    with pytest.raises(tokensieve.UnsupportedModelError, match="SiglipVisionModel vision tower is not supported"):
        Sieve("evocut", 4).apply(model)
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks


def test_four_d_attention_mask_is_refused(tiny, single):
    model, _ = tiny
    bad = dict(single)
    n = single["input_ids"].shape[1]
    bad["attention_mask"] = torch.ones(1, 1, n, n)
    with Sieve("evocut", 8)(model):
        with pytest.raises(tokensieve.PlaceholderError, match="2-D"):
            logits(model, bad)


def test_mismatched_placeholders(tiny, single):
    model, _ = tiny
    before = _snapshot(model)
    bad = dict(single)
    ids = single["input_ids"]
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[(ids[0] == model.config.image_token_id).nonzero()[0]] = False
    bad["input_ids"], bad["attention_mask"] = ids[:, keep], single["attention_mask"][:, keep]
    with Sieve("evocut", 8)(model):
        with pytest.raises(tokensieve.PlaceholderError, match="63 image placeholders .* produce 64"):
            logits(model, bad)
    _assert_same(before, _snapshot(model))


def test_one_sieve_per_model(tiny):
    model, _ = tiny
    with Sieve("evocut", 8)(model):
        with pytest.raises(tokensieve.TokensieveError, match="already has a sieve"):
            Sieve("pool", 16).apply(model)
    assert "generate" not in model.__dict__


def test_list_methods():
    infos = {m.name: m for m in tokensieve.list_methods()}
    assert {"evocut", "random", "pool", "fastervlm", "visionzip", "divprune"} <= set(infos)
    assert infos["evocut"].stage == "pre_projector" and infos["divprune"].stage == "post_projector"
    assert all(m.description for m in infos.values())


@pytest.mark.parametrize("method", ["evocut", "divprune"])
def test_encoder_runs_once_per_sieved_call(tiny, single, method):
    """The kept features reach generate() precomputed: no second vision pass, no projector on dropped tokens."""
    model, _ = tiny
    calls = {"tower": 0, "projector_tokens": []}

    def tower_hook(mod, args, out):
        calls["tower"] += 1

    def projector_hook(mod, args, out):
        calls["projector_tokens"].append(out.shape[1])

    handles = [
        model.model.vision_tower.register_forward_hook(tower_hook),
        model.model.multi_modal_projector.register_forward_hook(projector_hook),
    ]
    try:
        with Sieve(method, 8)(model):
            generate(model, single, n=3)
    finally:
        for h in handles:
            h.remove()
    assert calls["tower"] == 1
    # pre-projector methods project only what they keep; post-projector ones need every token projected
    assert calls["projector_tokens"] == ([N_TOKENS] if method == "divprune" else [8])


def test_report_carries_the_token_trace(tiny, images):
    """The per-layer token counts that FLOPs are computed from match the batch the model actually received."""
    model, processor = tiny
    batch = processor(
        images=[images[0], images[1], images[2]],
        text=[prompt(processor, "what ?"), prompt(processor, "what is in the picture ?", n_images=2)],
        padding=True,
        return_tensors="pt",
    )
    sieve = Sieve("evocut", budget=16)
    with sieve(model):
        model(**batch)
    rep = sieve.last_report
    n_layers = model.config.vision_config.num_hidden_layers
    assert rep.encoder_layer_tokens == [N_TOKENS + 1] * n_layers
    n_text = model.config.text_config.num_hidden_layers
    real = rep.attention_mask.sum(dim=1).tolist()
    assert rep.llm_layer_tokens == [[real[0]] * n_text, [real[1]] * n_text]
    assert rep.llm_layer_visual_tokens == [[16] * n_text, [32] * n_text]
    assert rep.to_dict()["llm_layer_visual_tokens"] == rep.llm_layer_visual_tokens


def test_sieved_generate_encodes_without_autograd(tiny, single):
    """HF generate() runs under no_grad; the encoding a sieve does before it must not build a graph either."""
    model, _ = tiny
    seen = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    try:
        with Sieve("evocut", budget=16)(model):
            model.generate(**single, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    assert seen == [False]


def test_vispruner_important_tokens_are_fastervlms(tiny, images):
    model, processor = tiny
    texts = [prompt(processor, "what is in the picture ?"), prompt(processor, "how many cats are on the couch ?")]
    batch = processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
    assert_vispruner_ranks_like_fastervlm(model, batch, 10)
