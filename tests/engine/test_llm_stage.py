"""The in-LLM stage on a tiny LLaVA with an 8-layer LM: equivalences, caches, batches, counts, errors."""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.errors import BudgetError, StageError
from tokensieve.methods import get_method
from tokensieve.methods.base import LLMMethod
from tokensieve.methods.todre import ToDRE, ToDRERelevance
from tokensieve.models.tiny import build_tiny_llava

from ..conftest import TINY, prompt

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


@pytest.mark.parametrize("method", ["todre"])  # FastV, PDrop, DART on every family: tests/families/test_conformance_*
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
