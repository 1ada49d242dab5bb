"""The in-LLM selectors on their own: FastV / PDrop / DART budget tables, DART against the official selection (on
hand-made signals and on a real tiny LM), ToDRE's first stage."""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.errors import BudgetError
from tokensieve.methods import get_method
from tokensieve.methods.base import averaged_tokens
from tokensieve.models.tiny import build_tiny_llava

from ..conftest import TINY, prompt


def logits(model, inputs):
    with torch.inference_mode():
        return model(**inputs).logits


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
