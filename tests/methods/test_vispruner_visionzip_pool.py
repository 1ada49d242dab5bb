"""VisPruner, VisionZip and pool on hand-made tensors, VisPruner against the official selection."""

from __future__ import annotations

import pytest
import torch

from tokensieve.methods import Layout, Signals, get_method
from tokensieve.methods.pool import pooled_grid
from tokensieve.methods.visionzip import default_contextual

from .signals import FEATURE_LAYER, HEADS, NUM_LAYERS, B, D, make_signals

# ---------------------------------------------------------------------------------------------------- vispruner


def official_vispruner(attention: torch.Tensor, features: torch.Tensor, k: int, ratio: float) -> list[int]:
    """What the official ``encode_images`` keeps for one image, step by step on Python lists.

    ``attention`` [H, N] is the CLS row of the feature layer, ``features`` [N, d] the vision features. Written from
    the official code's behaviour (Theia-4869/VisPruner): top int(k * ratio) by head-mean attention, then rounds
    that split the rest (attention order) into even / odd positions, drop the min(8, excess) even-position tokens
    with the highest best-match cosine to the odd ones, and put the survivors (most similar first) before the odd
    ones. The asserts mark where the official indexing would fail; callers pick inputs where it does not.
    """
    n = attention.shape[1]
    score = attention.double().mean(0).tolist()
    order = sorted(range(n), key=lambda i: -score[i])
    important_n = int(k * ratio)
    diverse_n = k - important_n
    important, residual = order[:important_n], order[important_n:]
    unit = (features.double() / features.double().norm(dim=-1, keepdim=True)).tolist()
    while diverse_n > 0:
        step = min(8, len(residual) - diverse_n)
        if step <= 0:
            break
        assert len(residual) % 2 == 0 and step <= len(residual) // 2, "the official indexing would fail here"
        evens, odds = residual[0::2], residual[1::2]
        best = [max(sum(x * y for x, y in zip(unit[a], unit[b])) for b in odds) for a in evens]
        by_similarity = sorted(range(len(evens)), key=lambda j: -best[j])
        residual = [evens[j] for j in by_similarity[step:]] + odds
    return sorted(important + (residual if diverse_n > 0 else []))


def _vispruner_signals(seed: int, b: int, side: int, d: int = 12) -> Signals:
    g = torch.Generator().manual_seed(seed)
    n = side * side
    return Signals(
        features=torch.randn(b, n, d, generator=g, dtype=torch.float64).float(),
        layout=Layout(grid=(side, side)),
        num_layers=NUM_LAYERS,
        feature_layer=FEATURE_LAYER,
        cls_attention={FEATURE_LAYER - 1: torch.softmax(torch.randn(b, HEADS, n, generator=g) * 2, dim=-1)},
    )


@pytest.mark.parametrize(
    "side,k,ratio",
    # the README's examples (576 tokens: 128 = 64 + 64, 64 = 48 + 16), other budgets the official code runs, and
    # the default model's 144-token grid
    [
        (24, 128, 0.5),
        (24, 64, 0.75),
        (24, 192, 0.5),
        (24, 32, 0.5),
        (24, 576, 0.5),
        (12, 36, 0.5),
        (12, 72, 0.5),
        (12, 36, 0.0),
        (12, 20, 1.0),
    ],
)
def test_vispruner_keeps_what_the_official_code_keeps(side, k, ratio):
    signals = _vispruner_signals(side * 1000 + k, 2, side)
    sel = get_method("vispruner")(important_ratio=ratio).select(signals, k)
    for i in range(2):
        expected = official_vispruner(signals.cls_attention[FEATURE_LAYER - 1][i], signals.features[i], k, ratio)
        assert sel.indices[i].tolist() == expected
    torch.testing.assert_close(sel.scores, signals.cls_attention[FEATURE_LAYER - 1].mean(1))


def test_vispruner_drops_duplicates_of_the_diverse_half_by_hand():
    # attention order 5, 2, 7, 0, 3, 6, 1, 4; k = 6 with 2 important (5, 2); residual 7, 0, 3, 6, 1, 4 must lose 2.
    # One round: A = 7, 3, 1 and B = 0, 6, 4. 7 duplicates 6 and 1 duplicates 4, 3 is unique -> 7 and 1 go.
    rank = [5, 2, 7, 0, 3, 6, 1, 4]
    attention = torch.zeros(1, 1, 8)
    for pos, token in enumerate(rank):
        attention[0, 0, token] = 1.0 - pos / 10
    vectors = {5: 0, 2: 1, 7: 2, 6: 2, 0: 3, 3: 4, 1: 5, 4: 5}  # token -> basis direction
    features = torch.stack([torch.eye(8)[vectors[t]] for t in range(8)]).unsqueeze(0)
    signals = Signals(
        features=features,
        layout=Layout(grid=(2, 4)),
        num_layers=NUM_LAYERS,
        feature_layer=FEATURE_LAYER,
        cls_attention={FEATURE_LAYER - 1: attention},
    )
    assert get_method("vispruner")(important_ratio=0.34).select(signals, 6).indices.tolist() == [[0, 2, 3, 4, 5, 6]]
    # FasterVLM on the same attention keeps the top 6 and so both copies of the duplicated direction
    assert get_method("fastervlm")().select(signals, 6).indices.tolist() == [[0, 2, 3, 5, 6, 7]]


@pytest.mark.parametrize("side,k", [(12, 18), (24, 9), (12, 3), (12, 1)])
def test_vispruner_keeps_exactly_k_where_the_official_indexing_fails(side, k):
    # 144 tokens, k = 18: the residual (135) is odd; 576 tokens, k = 9: the last round asks for 7 of 6 A tokens
    signals = _vispruner_signals(7, 2, side)
    with pytest.raises(AssertionError, match="official indexing"):
        official_vispruner(signals.cls_attention[FEATURE_LAYER - 1][0], signals.features[0], k, 0.5)
    sel = get_method("vispruner")().select(signals, k)
    assert sel.indices.shape == (2, k)
    important = int(k * 0.5)
    for i in range(2):
        top = signals.cls_attention[FEATURE_LAYER - 1][i].mean(0).argsort(descending=True)[:important].tolist()
        assert set(top) <= set(sel.indices[i].tolist())
    with pytest.raises(ValueError, match="important_ratio"):
        get_method("vispruner")(important_ratio=1.5)


# ---------------------------------------------------------------------------------------------------- visionzip


def _zip_case(with_cls: bool) -> tuple[Signals, torch.Tensor]:
    layer = FEATURE_LAYER - 1
    g = torch.Generator().manual_seed(5)
    features = torch.randn(1, 8, D, generator=g)
    attention = torch.full((1, 2, 8), 0.01)
    attention[0, 0, 2] = 0.5  # dominant: 2 and 5
    attention[0, 1, 5] = 0.4
    e0, e1 = torch.eye(4)[0], torch.eye(4)[1]
    key = torch.stack([e0, e0 + 0.1 * e1, e1, e1 + 0.1 * e0, e1, e0, e1, e0 + 0.2 * e1])  # [8, 4]
    keys = torch.stack([2 * key, torch.zeros_like(key)]).unsqueeze(0)  # head mean = key
    signals = Signals(
        features=features,
        layout=Layout(grid=(2, 4)),
        num_layers=NUM_LAYERS,
        feature_layer=FEATURE_LAYER,
        cls_attention={layer: attention},
        keys={layer: keys},
        cls_hidden=torch.randn(1, D, generator=g) if with_cls else None,
    )
    f = features[0]
    # remaining = 0 1 3 4 6 7, stride 3 -> targets 0 and 4; 1, 7 join target 0; 3, 6 join target 4
    ctx = torch.stack([f[0] + (f[1] + f[7]) / 2, f[4] + (f[3] + f[6]) / 2])
    expected = torch.cat([f[[2, 5]], ctx]).unsqueeze(0)
    if with_cls:
        expected = torch.cat([signals.cls_hidden.unsqueeze(1), expected], dim=1)
    return signals, expected


def test_visionzip_contextual_is_target_plus_mean_of_members():
    signals, expected = _zip_case(with_cls=False)
    sel = get_method("visionzip")(contextual=2).select(signals, 4)
    assert sel.indices.tolist() == [[2, 5]]
    assert sel.num_merged == 2
    torch.testing.assert_close(sel.output(signals.features), expected)

    signals, expected = _zip_case(with_cls=True)
    sel = get_method("visionzip")(contextual=2).select(signals, 5)
    assert sel.indices.tolist() == [[2, 5]]
    assert sel.num_merged == 3
    torch.testing.assert_close(sel.output(signals.features), expected)
    # the CLS is requested but absent -> its slot goes to a patch
    no_cls = get_method("visionzip")(contextual=2)
    signals.cls_hidden = None
    assert no_cls.select(signals, 5).indices.shape == (1, 3)


def test_visionzip_target_without_members_is_kept_alone():
    signals, _ = _zip_case(with_cls=False)
    layer = FEATURE_LAYER - 1
    keys = signals.keys[layer].clone()
    keys[0, 0, 4] = -2 * torch.eye(4)[3]  # target 4 now attracts nobody
    signals.keys[layer] = keys
    out = get_method("visionzip")(contextual=2).select(signals, 4).output(signals.features)
    f = signals.features[0]
    torch.testing.assert_close(out[0, 3], f[4])
    torch.testing.assert_close(out[0, 2], f[0] + (f[1] + f[3] + f[6] + f[7]) / 4)


def test_visionzip_default_split():
    assert [default_contextual(k) for k in (1, 2, 64, 128, 192)] == [0, 1, 10, 20, 30]
    signals = make_signals(grid=(10, 10))
    sel = get_method("visionzip")().select(signals, 64)
    assert sel.num_out == 64 and sel.num_merged == 11  # CLS + 10 contextual
    assert sel.indices.shape == (B, 53)  # 54 dominant = CLS + 53 patches
    sel = get_method("visionzip")(include_cls=False).select(signals, 64)
    assert sel.num_merged == 10 and sel.indices.shape == (B, 54)
    assert get_method("visionzip")().request(24, 23).cls_attention == (22,)
    with pytest.raises(ValueError, match="contextual"):
        get_method("visionzip")(contextual=-1)
    with pytest.raises(ValueError, match="contextual"):
        get_method("visionzip")(contextual=7).select(make_signals(), 7)  # no room left for the CLS


def test_visionzip_keeps_prefix_cls_candidate():
    signals = make_signals(num_prefix=1)
    signals.cls_attention[FEATURE_LAYER - 1][:, :, 0] = 0.0  # least attended, still forced in
    sel = get_method("visionzip")().select(signals, 10)
    assert sel.num_out == 10
    assert bool((sel.indices[:, 0] == 0).all())
    torch.testing.assert_close(sel.output(signals.features)[:, 0], signals.features[:, 0])


# --------------------------------------------------------------------------------------------------------- pool


def test_pool_k9_is_2x2_block_means():
    signals = make_signals()
    sel = get_method("pool")().select(signals, 9)
    blocks = signals.features.reshape(B, 3, 2, 3, 2, D).mean(dim=(2, 4)).reshape(B, 9, D)
    torch.testing.assert_close(sel.output(signals.features), blocks)
    assert sel.indices[0].tolist() == [0, 2, 4, 12, 14, 16, 24, 26, 28]
    assert sel.num_merged == 9


def test_pool_grid_choice_and_errors():
    assert pooled_grid(12, (6, 6)) == (4, 3)  # equal aspect error: more rows wins
    assert pooled_grid(8, (4, 8)) == (2, 4)
    assert pooled_grid(6, (6, 6)) == (3, 2)
    with pytest.raises(ValueError, match="k=7"):
        get_method("pool")().select(make_signals(), 7)


def test_pool_keeps_prefix_tokens():
    signals = make_signals(num_prefix=1)
    sel = get_method("pool")().select(signals, 10)
    out = sel.output(signals.features)
    assert torch.equal(out[:, 0], signals.features[:, 0])
    blocks = signals.features[:, 1:].reshape(B, 3, 2, 3, 2, D).mean(dim=(2, 4)).reshape(B, 9, D)
    torch.testing.assert_close(out[:, 1:], blocks)
    assert sel.indices[0].tolist() == [0] + [1 + i for i in (0, 2, 4, 12, 14, 16, 24, 26, 28)]
    with pytest.raises(ValueError):
        get_method("pool")().select(signals, 1)
    assert torch.equal(get_method("pool")().select(signals, 37).output(signals.features), signals.features)
