"""The in-LLM stage on a tiny LLaVA with an 8-layer LM: equivalences, caches, batches, counts, errors."""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.errors import BudgetError, StageError
from tokensieve.methods import get_method
from tokensieve.methods.base import LLMMethod, averaged_tokens
from tokensieve.methods.todre import ToDRE, ToDRERelevance
from tokensieve.models.tiny import build_tiny_llava

from .conftest import N_TOKENS, TINY, prompt

LAYERS = 8
IN_LLM = ["fastv", "pdrop", "dart"]


@pytest.fixture(scope="module")
def deep():
    return build_tiny_llava(**dict(TINY, text_layers=LAYERS))


@pytest.fixture(scope="module")
def deep_eager():
    return build_tiny_llava(**dict(TINY, text_layers=LAYERS), attn_implementation="eager")


@pytest.fixture(scope="module")
def one(deep, images):
    _, processor = deep
    return processor(images=[images[0]], text=[prompt(processor, "what is in the picture ?")], return_tensors="pt")


def logits(model, inputs, **kw):
    with torch.inference_mode():
        return model(**inputs, **kw).logits


def generate(model, inputs, n=5, **kw):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def layer_hooks(model):
    return sum(len(layer._forward_pre_hooks) for layer in model.get_decoder().layers)


class Fixed(LLMMethod):
    """Keeps given indices of each image after ``layer``: the same pruning for every call."""

    name = "fixed"
    description = "test helper"

    def __init__(self, layer, keep):
        self.layer, self.keep = layer, keep

    def schedule(self, n, num_layers, target):
        return [(self.layer, len(self.keep[0]))]

    def select_llm(self, signals, ks):
        return [torch.tensor(k) for k in self.keep[: len(signals.segments)]]


class Replay(LLMMethod):
    """Records a method's selections on the first call and returns them on later calls (same pruning)."""

    name = "replay"
    description = "test helper"

    def __init__(self, inner):
        self.inner, self.recording, self.saved = inner, True, {}
        self.query, self.attention_from = inner.query, inner.attention_from
        self.needs_keys, self.budgeted, self.final_norm = inner.needs_keys, inner.budgeted, inner.final_norm

    def schedule(self, n, num_layers, target):
        return self.inner.schedule(n, num_layers, target)

    def select_llm(self, signals, ks):
        if self.recording:
            self.saved[signals.layer] = self.inner.select_llm(signals, ks)
        return self.saved[signals.layer]


class Boom(Fixed):
    def select_llm(self, signals, ks):
        raise RuntimeError("boom")


# ------------------------------------------------------------------------------------------------ equivalences


@pytest.mark.parametrize("method", IN_LLM)
@pytest.mark.parametrize("budget", [N_TOKENS, 1.0])
def test_keep_all_equals_vanilla(deep, one, method, budget):
    model, _ = deep
    want, want_gen = logits(model, one), generate(model, one)
    sieve = Sieve(method, budget)
    with sieve(model):
        got, got_gen = logits(model, one), generate(model, one)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_gen, want_gen)
    assert sieve.last_report.llm_layer_visual_tokens == [[N_TOKENS] * LAYERS]
    assert sieve.last_report.stage == "in_llm" and sieve.last_report.budget == str(sieve.budget)
    assert layer_hooks(model) == 0


@pytest.mark.parametrize("method", IN_LLM + ["todre"])
def test_cached_decoding_equals_no_cache_recompute(deep, one, method):
    """Greedy generate with the KV cache == step-by-step full recompute without cache, under the same pruning."""
    model, _ = deep
    if method == "todre":
        replay = Replay(ToDRERelevance(tau=0.99))
        sieve = Sieve([ToDRE(relevance=False), replay], [20, 1])
    else:
        replay = Replay(get_method(method)())
        sieve = Sieve(replay, 20)
    with sieve(model):
        out = generate(model, one, n=6, return_dict_in_generate=True, output_logits=True)
    replay.recording = False
    cache = out.past_key_values
    lengths = [cache.layers[i].get_seq_length() for i in range(LAYERS)]
    assert lengths[0] > lengths[-1]  # pruned layers hold fewer entries
    seq, n_prompt = out.sequences, one["input_ids"].shape[1]
    with sieve(model):
        for t in range(seq.shape[1] - n_prompt):
            ids = seq[:, : n_prompt + t]
            step = logits(model, dict(one, input_ids=ids, attention_mask=torch.ones_like(ids)), use_cache=False)
            torch.testing.assert_close(step[:, -1], out.logits[t], rtol=1e-4, atol=1e-4)
    if method == "todre":
        assert sieve.last_report.llm_layer_visual_tokens[0][-1] == 0  # tau 0.99: every visual token left


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_batch_with_left_padding_equals_single_calls(deep, images, method):
    """Samples with different image counts keep different numbers of tokens: extra slots line them up."""
    model, processor = deep
    texts = [
        prompt(processor, "what is in the picture ?"),
        prompt(processor, "how many cats are there on the couch ?", 2),
    ]
    imgs = [[images[0]], [images[1], images[2]]]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=[i for g in imgs for i in g], text=texts, return_tensors="pt", padding=True)
    sieve = Sieve(method, 24)
    with sieve(model):
        together = generate(model, batch)
        counts = sieve.last_report.llm_layer_visual_tokens
        singles = []
        for t, g in zip(texts, imgs):
            alone = processor(images=g, text=[t], return_tensors="pt")
            singles.append((generate(model, alone)[0, alone["input_ids"].shape[1] :], sieve.last_report))
    n_in = batch["input_ids"].shape[1]
    for s, (ans, rep) in enumerate(singles):
        assert torch.equal(together[s, n_in:], ans)
        assert counts[s] == rep.llm_layer_visual_tokens[0]
    assert counts[1][-1] == 2 * counts[0][-1]  # per-image budgets: the two-image sample keeps twice as many


def test_batch_with_right_padding_equals_single_calls(deep, images):
    model, processor = deep
    texts = [prompt(processor, "what is in the picture ?"), prompt(processor, "how many cats are on the red couch ?")]
    processor.tokenizer.padding_side = "right"
    try:
        batch = processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "left"
    sieve = Sieve("fastv", 20)
    with sieve(model):
        together = logits(model, batch)
        rep = sieve.last_report
        for s, t in enumerate(texts):
            alone = processor(images=[images[s]], text=[t], return_tensors="pt")
            single = logits(model, alone)[0]
            real = (rep.llm_kept_positions[s] >= 0) & (
                rep.attention_mask[s][rep.llm_kept_positions[s].clamp(min=0)] == 1
            )
            torch.testing.assert_close(together[s][real], single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", IN_LLM + ["todre"])
def test_eager_and_sdpa_select_the_same_tokens(deep, deep_eager, one, method):
    reports = []
    for model, _ in (deep, deep_eager):
        sieve = Sieve(method, 24)
        with sieve(model):
            generate(model, one, n=2)
        reports.append(sieve.last_report)
    a, b = reports
    assert torch.equal(a.llm_kept_positions[0], b.llm_kept_positions[0])
    assert a.llm_layer_visual_tokens == b.llm_layer_visual_tokens


# ------------------------------------------------------------------------------------------------------ counts


def test_composed_stages_keep_counts_consistent(deep, one):
    model, _ = deep
    sieve = Sieve(["evocut", "fastv"], budget=[32, 16])
    with sieve(model):
        generate(model, one, n=2)
    rep = sieve.last_report
    assert rep.method == "evocut+fastv" and rep.stage == "pre_projector+in_llm" and rep.llm_budget == "16"
    assert rep.tokens_out == 32
    visual, tokens = rep.llm_layer_visual_tokens[0], rep.llm_layer_tokens[0]
    k = round((16 * LAYERS - 2 * 32) / (LAYERS - 2))
    assert visual == [32, 32] + [k] * (LAYERS - 2)
    text = int(rep.attention_mask.sum()) - 32
    assert tokens == [v + text for v in visual]
    assert rep.images[0].llm_layer_tokens == visual
    assert abs(rep.llm_visual_tokens_avg[0] - 16) < 0.5 and rep.images[0].llm_tokens_avg == rep.llm_visual_tokens_avg[0]
    assert "layer-averaged visual tokens" in rep.summary()


def test_todre_removes_every_visual_token_below_tau(deep, one):
    model, _ = deep
    removed, kept = Sieve("todre", 20, tau=0.99), Sieve("todre", 20, tau=0.01)
    for sieve in (removed, kept):
        with sieve(model):
            generate(model, one, n=2)
    layer = round(7 / 8 * LAYERS)
    assert removed.last_report.llm_layer_visual_tokens[0] == [20] * layer + [0] * (LAYERS - layer)
    assert kept.last_report.llm_layer_visual_tokens[0] == [20] * LAYERS
    assert removed.last_report.tokens_out == 20


# ------------------------------------------------------------------------------------------------------ safety


@pytest.mark.parametrize("call", ["generate", "forward"])
def test_hooks_are_removed_when_a_call_raises(deep, one, call):
    model, _ = deep
    sieve = Sieve(Boom(2, [[0]]), 1.0)
    with sieve(model):
        with pytest.raises(RuntimeError, match="boom"):
            generate(model, one) if call == "generate" else logits(model, one)
        assert layer_hooks(model) == 0
    assert layer_hooks(model) == 0 and "generate" not in model.__dict__


@pytest.mark.parametrize(
    "methods,budget,match",
    [
        (["fastv", "pdrop"], [32, 16], "only one in-LLM"),
        (["fastv", "evocut"], [16, 32], "must come before"),
        (["evocut", "divprune"], [32, 16], "one method per pre-LLM"),
        (["todre", "fastv"], [32, 16], "runs its own in-LLM stage"),
        (["evocut", "fastv"], 32, "one budget each"),
        (["evocut", "fastv"], [32], "one per method"),
        (["evocut", "fastv"], [16, 32], "exceeds the 16 tokens"),
        ([], 32, "at least one"),
    ],
)
def test_bad_stage_combinations_are_clear_errors(methods, budget, match):
    with pytest.raises(StageError, match=match):
        Sieve(methods, budget)


def test_unreachable_and_mismatched_budgets_are_clear_errors(deep, one):
    model, _ = deep
    with pytest.raises(BudgetError, match="out of reach"):
        with Sieve("fastv", 8)(model):  # 64 tokens through 2 of 8 layers already average 16
            logits(model, one)
    with pytest.raises(StageError, match="labels"):
        with Sieve("fastv", 32)(model):
            model(**one, labels=one["input_ids"])
    assert layer_hooks(model) == 0


# ----------------------------------------------------------------------------------------------------- methods


def test_budget_mappings_match_the_documented_tables():
    fastv, dart, pdrop = get_method("fastv")(), get_method("dart")(), get_method("pdrop")
    assert [fastv.schedule(576, 32, t) for t in (192, 128, 64)] == [[(2, 166)], [(2, 98)], [(2, 30)]]
    assert dart.schedule(576, 32, 128) == fastv.schedule(576, 32, 128)
    published = pdrop(ratio=0.5).schedule(576, 32, None)
    assert published == [(8, 288), (16, 144), (24, 72)] and averaged_tokens(576, 32, published) == 270
    # the official ratio list counts int(n * ratio): 575 tokens keep 287, 143, 71 (not 288, 144, 72)
    assert pdrop(ratio=0.5).schedule(575, 32, None) == [(8, 287), (16, 143), (24, 71)]
    for target in (192, 128, 64):
        plan = pdrop().schedule(576, 24, target)
        assert abs(averaged_tokens(576, 24, plan) - target) < 1.5
        assert [c for _, c in plan] == sorted((c for _, c in plan), reverse=True)
    assert [layer for layer, _ in pdrop().schedule(576, 24, 192)] == [6, 12, 18]
    assert pdrop().schedule(576, 24, 64)[0][0] == 2  # below the default boundaries' reach: the early schedule
    with pytest.raises(BudgetError, match="pdrop cannot average"):
        pdrop().schedule(576, 24, 40)


def _signals(hidden, keys, segments, text_keys=None, text_hidden=None):
    from tokensieve.methods.base import LLMSignals

    return LLMSignals(
        hidden=hidden, segments=segments, layer=2, num_layers=8, keys=keys, text_keys=text_keys, text_hidden=text_hidden
    )


def test_dart_keeps_exactly_k_and_prefers_tokens_unlike_the_pivots():
    torch.manual_seed(0)
    base = torch.randn(1, 16)
    hidden = base.repeat(12, 1) + 0.01 * torch.randn(12, 16)  # 12 near-duplicates ...
    distinct = torch.randn(4, 16)
    hidden = torch.cat([hidden, distinct])  # ... and 4 distinct tokens at 12..15
    keys = torch.ones(16, 8)
    keys[0] *= 10  # token 0 is the image pivot
    kept = get_method("dart")(pivots_image=1, pivots_text=0).select_llm(_signals(hidden, keys, [16]), [5])[0]
    assert kept.tolist() == [0, 12, 13, 14, 15]
    # per image, in order: two images of 8 get their own k
    two = get_method("dart")(pivots_image=1, pivots_text=0).select_llm(_signals(hidden, keys, [8, 8]), [3, 2])
    assert [len(t) for t in two] == [3, 2] and all(bool((t[1:] > t[:-1]).all()) for t in two)


def _official_dart(normed, keys, start, length, pivots_image, pivots_text, per_pivot):
    """The official ``get_retained_image_token`` written out from its description, for one sample (batch 1): key L1
    norms pick image pivots in the image span and text pivots after it; a set of their positions is walked, each
    pivot claiming its ``per_pivot`` least cosine-similar free image tokens; image pivots and claims are kept."""
    img = torch.norm(keys[start : start + length], p=1, dim=-1)
    txt = torch.norm(keys[start + length :], p=1, dim=-1)
    image_idx = (img.topk(pivots_image).indices + start).tolist()
    query_idx = (txt.topk(pivots_text).indices + start + length).tolist()
    kept = set(image_idx + query_idx)
    free = set(range(start, start + length)) - set(image_idx)
    for item in list(kept):
        pool = list(free)
        unlike = -torch.nn.functional.cosine_similarity(normed[item], normed[pool], dim=-1)
        claims = [pool[i] for i in unlike.topk(per_pivot).indices.tolist()]
        kept.update(claims)
        free.difference_update(claims)
    kept.difference_update(query_idx)
    return sorted(kept)


@pytest.fixture(scope="module")
def dart_model():
    """A 4-layer tiny LLaVA whose final norm has uneven weights, so normalising changes the cosine similarities."""
    model, processor = build_tiny_llava(**dict(TINY, text_layers=4))
    with torch.no_grad():
        model.model.language_model.norm.weight.copy_(torch.linspace(0.05, 4.0, 64) ** 2)
    return model, processor


def test_dart_keeps_what_the_official_selection_keeps_on_final_normed_states(dart_model, images):
    """DART at K=2 on a real (tiny) LM against the official selection computed from the vanilla run's cache keys of
    layer 1 and the final-normed hidden states entering layer 2. Budget 42 averaged over 4 layers keeps 20 of 64
    from layer 2 on: 4 image pivots + 8 pivots x 2 claims, the official count for max_num_trunction = 16."""
    model, processor = dart_model
    for i, question in enumerate(["what is in the picture ?", "how many cats are on the couch ?"]):
        one = processor(images=[images[i]], text=[prompt(processor, question)], return_tensors="pt")
        ids = one["input_ids"][0]
        vis = (ids == model.config.image_token_id).nonzero().flatten()
        start, length = int(vis[0]), int(vis.numel())
        with torch.inference_mode():
            out = model(**one, output_hidden_states=True, use_cache=True)
        layer1 = out.past_key_values.layers[1].keys  # [1, H_kv, L, hd], post-RoPE, as the official code reads them
        keys = layer1.permute(0, 2, 1, 3).reshape(layer1.shape[2], -1)
        entering = out.hidden_states[2][0]  # the output of layer 1
        with torch.inference_mode():
            normed = model.model.language_model.norm(entering)
        want = _official_dart(normed, keys, start, length, 4, 4, 2)
        raw = _official_dart(entering, keys, start, length, 4, 4, 2)
        sieve = Sieve("dart", 42)
        with sieve(model):
            logits(model, one)
        kept = [int(p) for p in sieve.last_report.llm_kept_positions[0] if start <= int(p) < start + length]
        assert kept == want
        if i == 0:
            assert raw != want  # the uneven final norm changes which tokens duplicate the pivots least


def test_dart_walks_its_pivots_in_the_official_set_order():
    """Which pivot claims first decides what is kept. The official walk is ``list(set(positions))``: for pivots at
    positions 1 and 32 CPython iterates [32, 1] (hash order in its 8-slot table), not the key-norm order [1, 32]."""
    from tokensieve.methods.base import LLMSignals

    assert list(set([1, 32])) == [32, 1] and list(set([1, 2])) == [1, 2]
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # token 2 unlike 0, token 3 unlike 1
    keys = torch.tensor([[5.0], [4.0], [0.1], [0.1]])  # tokens 0 and 1 are the image pivots, 0 first by key norm
    sig = LLMSignals(
        hidden=hidden,
        segments=[4],
        layer=2,
        num_layers=4,
        keys=keys,
        positions=torch.tensor([1, 32, 33, 34]),
        text_keys=torch.empty(0, 1),
        text_hidden=torch.empty(0, 2),
        text_positions=torch.empty(0, dtype=torch.long),
    )
    dart = get_method("dart")(pivots_image=2, pivots_text=0)
    assert dart.select_llm(sig, [3])[0].tolist() == [0, 1, 3]  # one claim: the pivot at position 32 makes it
    sig.positions = torch.tensor([1, 2, 3, 4])
    assert dart.select_llm(sig, [3])[0].tolist() == [0, 1, 2]  # walk [1, 2]: the pivot at position 1 claims


def test_dart_text_pivots_come_from_the_text_after_the_image():
    """A text token before the image with the largest key norm is not a pivot (the official code looks only after
    the image); the one after the image is, and claims the token least like it."""
    from tokensieve.methods.base import LLMSignals

    hidden = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    keys = torch.tensor([[5.0], [0.1], [0.1], [0.1]])  # token 0 is the image pivot; least like it: token 3
    text_hidden = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])  # before the image (least like: token 1), after (token 2)
    sig = LLMSignals(
        hidden=hidden,
        segments=[4],
        layer=2,
        num_layers=4,
        keys=keys,
        positions=torch.arange(5, 9),
        text_keys=torch.tensor([[9.0], [1.0]]),
        text_hidden=text_hidden,
        text_positions=torch.tensor([2, 10]),
    )
    # one claim, made by the first pivot of the walk list(set([5, 10])) = [10, 5]: the text pivot after the image
    kept = get_method("dart")(pivots_image=1, pivots_text=1).select_llm(sig, [2])[0]
    assert list(set([5, 10])) == [10, 5] and kept.tolist() == [0, 2]


def test_todre_stage_one_is_max_sum_diverse_from_the_cls_pivot():
    from tokensieve.methods.base import Layout, Signals

    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    att = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1]).view(1, 1, 5)
    sig = Signals(features=x[None], layout=Layout((1, 5)), num_layers=3, feature_layer=2, cls_attention={2: att})
    assert get_method("todre")().select(sig, 2).indices.tolist() == [[1, 3]]  # pivot 1, then its opposite
    assert get_method("todre")(objective="max_min").select(sig, 3).indices.shape == (1, 3)
