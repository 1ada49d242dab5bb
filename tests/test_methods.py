"""Selectors on hand-made tensors: contract checks for every method, then method-specific behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.methods import IN_LLM, Layout, Selection, Signals, get_method, method_names
from tokensieve.methods.base import IN_ENCODER, POST_PROJECTOR, PRE_PROJECTOR
from tokensieve.methods.divprune import cosine_distances, maxmin_select
from tokensieve.methods.evocut import evocut_scores
from tokensieve.methods.pool import pooled_grid
from tokensieve.methods.visionzip import default_contextual

PRE = [n for n in method_names() if get_method(n).stage in (PRE_PROJECTOR, POST_PROJECTOR)]  # the Signals contract

B, GRID, D, HEADS, HEAD_DIM = 2, (6, 6), 16, 4, 8
N = GRID[0] * GRID[1]
NUM_LAYERS, FEATURE_LAYER = 6, 5
# selectors on post-encoder signals; in-encoder methods are tested in test_encoder_stage.py
SELECTORS = PRE


def make_signals(seed: int = 0, b: int = B, grid=GRID, d: int = D, num_prefix: int = 0) -> Signals:
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] + num_prefix
    hidden = {i: torch.randn(b, n, d, generator=g) for i in range(NUM_LAYERS + 1)}
    attention = {
        i: torch.softmax(torch.randn(b, HEADS, n + 1, generator=g) * 3, dim=-1)[..., 1:] for i in range(NUM_LAYERS)
    }
    keys = {i: torch.randn(b, HEADS, n, HEAD_DIM, generator=g) for i in range(NUM_LAYERS)}
    received = {i: torch.rand(b, n, generator=g) / n for i in range(NUM_LAYERS)}
    return Signals(
        features=hidden[FEATURE_LAYER].clone(),
        layout=Layout(grid=grid, num_prefix=num_prefix),
        num_layers=NUM_LAYERS,
        feature_layer=FEATURE_LAYER,
        hidden_states=hidden,
        cls_attention=attention,
        keys=keys,
        cls_hidden=torch.randn(b, d, generator=g),
        attention_received=received,
    )


def image(signals: Signals, i: int) -> Signals:
    """The signals of image ``i`` alone, as a batch of one."""
    return signals.row(i)


def run(name: str, signals: Signals, k: int, **params) -> Selection:
    method = get_method(name)(**params)
    request = method.request(signals.num_layers, signals.feature_layer)
    # the method must only need what it asked for
    kept = Signals(
        features=signals.features,
        layout=signals.layout,
        num_layers=signals.num_layers,
        feature_layer=signals.feature_layer,
        hidden_states={i: signals.hidden_states[i] for i in request.hidden_states},
        cls_attention={i: signals.cls_attention[i] for i in request.cls_attention},
        keys={i: signals.keys[i] for i in request.keys},
        cls_hidden=signals.cls_hidden if request.cls_hidden else None,
        attention_received={i: signals.attention_received[i] for i in request.attention_received},
    )
    return method.select(kept, k)


# ----------------------------------------------------------------------------------------------------- contract


def test_registry_lists_every_method():
    assert method_names() == sorted(
        [
            "evocut",
            "divprune",
            "visionzip",
            "fastervlm",
            "vispruner",
            "pool",
            "random",
            "evoprune",
            "flowcut",
            "hiprune",
            "vtc_cls",
            "todre",
            "fastv",
            "pdrop",
            "dart",
        ]
    )
    assert PRE == sorted(
        ["evocut", "divprune", "visionzip", "fastervlm", "vispruner", "pool", "random", "todre", "hiprune", "vtc_cls"]
    )
    for name in method_names():
        cls = get_method(name)
        assert cls.name == name
        assert cls.stage in (PRE_PROJECTOR, POST_PROJECTOR, IN_ENCODER, IN_LLM)
        assert isinstance(cls.description, str) and "\n" not in cls.description and cls.description
        assert isinstance(cls.signals, tuple)
    assert get_method("divprune").stage == POST_PROJECTOR


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("k", [1, 7, N])
def test_contract(name, k):
    signals = make_signals()
    if name == "pool" and k == 7:  # 7 = 1 x 7 cannot fit a 6 x 6 grid
        with pytest.raises(ValueError):
            run(name, signals, k)
        return
    sel = run(name, signals, k)
    idx = sel.indices
    assert idx.dtype == torch.int64 and idx.dim() == 2 and idx.shape[0] == B
    assert sel.num_out == k
    out = sel.output(signals.features)
    assert out.shape == (B, k, D)
    assert out.dtype == signals.features.dtype
    if idx.shape[1]:
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be strictly ascending (so unique)"
        assert int(idx.min()) >= 0 and int(idx.max()) < N
    if name != "visionzip":
        assert idx.shape == (B, k)
    if sel.scores is not None:
        assert sel.scores.shape == (B, N)
    if k == N:
        assert torch.equal(out, signals.features)
        assert sel.num_merged == 0

    again = run(name, signals, k)
    assert torch.equal(again.indices, idx)
    assert torch.equal(again.output(signals.features), out)

    for i in range(B):
        alone = run(name, image(signals, i), k)
        assert torch.equal(alone.indices, idx[i : i + 1])
        torch.testing.assert_close(alone.output(signals.features[i : i + 1]), out[i : i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SELECTORS)
def test_budget_out_of_range_is_an_error(name):
    signals = make_signals()
    for k in (0, N + 1):
        with pytest.raises(ValueError):
            run(name, signals, k)


# ------------------------------------------------------------------------------------------------------- evocut


def _crowd_states(special: int, steps: int = 5, n: int = N, d: int = D, b: int = 1) -> list[torch.Tensor]:
    """Every token moves along one of 3 shared directions, except ``special``, which moves orthogonally.

    The directions come in raster blocks of n / 3 tokens, so the strided K-means seeds (tokens 0, n/3, 2n/3 for
    M = 3) each start on one of them. With more centres than real directions a lone odd token can capture a
    spare centre of its own and then score ~0: that is the algorithm as specified, so the test uses M = 3.
    """
    g = torch.Generator().manual_seed(1)
    basis = torch.eye(d)
    direction = basis[(torch.arange(n) * 3) // n].clone()
    direction[special] = basis[5]
    states = [torch.randn(b, n, d, generator=g)]
    for _ in range(steps):
        magnitude = 0.5 + torch.rand(b, n, 1, generator=g)
        noise = 1e-3 * torch.randn(b, n, d, generator=g)
        states.append(states[-1] + magnitude * direction + noise)
    return states


def test_evocut_ranks_the_odd_mover_first():
    special = 17
    states = _crowd_states(special, b=2)
    scores = evocut_scores(states, num_groups=3, iterations=2, alpha=0.95)
    assert scores.shape == (2, N)
    assert torch.equal(scores.argmax(dim=-1), torch.tensor([special, special]))
    # crowd tokens are well explained by a group direction; the odd one is not
    others = torch.cat([scores[:, :special], scores[:, special + 1 :]], dim=1)
    assert float(others.max()) < 0.1 * float(scores[:, special].min())

    # through the method: hidden_states indices l0-1 .. end, k = 1 keeps the odd token
    signals = make_signals(b=2)
    signals.hidden_states = {i: s for i, s in enumerate(states)}
    method = get_method("evocut")(start_layer=1, end_layer=5, num_groups=3)
    assert method.request(NUM_LAYERS, FEATURE_LAYER).hidden_states == (0, 1, 2, 3, 4, 5)
    sel = method.select(signals, 1)
    assert sel.indices.tolist() == [[special], [special]]
    torch.testing.assert_close(sel.scores, scores)


def test_evocut_scores_bounds_and_zero_moves():
    g = torch.Generator().manual_seed(2)
    states = [torch.randn(3, 20, 8, generator=g) for _ in range(4)]
    scores = evocut_scores(states, num_groups=5)
    assert scores.shape == (3, 20)
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 2.0
    # the EMA weights sum to 1 - alpha^T, so the score can never exceed 2 * (1 - alpha^T)
    assert float(scores.max()) <= 2.0 * (1 - 0.95**3) + 1e-6
    # nothing moves: every move is the zero vector, deviation 1 everywhere -> s = 1 - alpha^T
    frozen = [states[0]] * 3
    torch.testing.assert_close(evocut_scores(frozen, alpha=0.5), torch.full((3, 20), 0.75))
    # an unbatched input is accepted and matches the batched path
    torch.testing.assert_close(evocut_scores([s[1] for s in states]), scores_of_image(states, 1))


def scores_of_image(states, i):
    return evocut_scores([s[i : i + 1] for s in states])[0]


def test_evocut_more_groups_than_tokens_is_capped():
    g = torch.Generator().manual_seed(3)
    states = [torch.randn(1, 3, 4, generator=g) for _ in range(2)]
    # with a centre per token every token is perfectly explained
    torch.testing.assert_close(evocut_scores(states, num_groups=8, alpha=0.0), torch.zeros(1, 3), atol=1e-6, rtol=0)


def test_evocut_defaults_and_validation():
    method = get_method("evocut")()
    assert method.request(24, 23).hidden_states == tuple(range(11, 25))
    assert get_method("evocut")(end_layer=23).request(24, 23).hidden_states == tuple(range(11, 24))
    for bad in (1.0, -0.1, 1.5, "x"):
        with pytest.raises(ValueError, match="alpha"):
            get_method("evocut")(alpha=bad)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="start_layer"):
            get_method("evocut")(start_layer=bad)
    with pytest.raises(ValueError, match="start_layer"):
        get_method("evocut")(start_layer=5, end_layer=3)
    with pytest.raises(ValueError, match="num_groups"):
        get_method("evocut")(num_groups=0)
    with pytest.raises(ValueError, match="eps"):
        get_method("evocut")(eps=0.0)
    with pytest.raises(ValueError, match="start_layer=7"):
        get_method("evocut")(start_layer=7).request(6, 5)
    with pytest.raises(ValueError, match="end_layer=9"):
        get_method("evocut")(end_layer=9).request(6, 5)


def test_evocut_missing_hidden_state_is_reported():
    signals = make_signals()
    del signals.hidden_states[3]
    with pytest.raises(ValueError, match="missing"):
        get_method("evocut")().select(signals, 4)


# ----------------------------------------------------------------------------------------------------- divprune


def test_divprune_duplicates_pick_one_of_each_direction():
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g)).Q.T  # orthonormal rows
    group = torch.tensor([0, 1, 0, 2, 1, 0, 3, 1, 0])  # groups 0 and 1 are exact-duplicate groups
    scale = 1 + torch.rand(len(group), 1, generator=g)  # same direction, different norms
    x = (basis[group] * scale).unsqueeze(0)
    signals = Signals(features=x, layout=Layout(grid=(3, 3)), num_layers=NUM_LAYERS, feature_layer=FEATURE_LAYER)
    sel = get_method("divprune")().select(signals, 4)
    assert sorted(group[sel.indices[0]].tolist()) == [0, 1, 2, 3]
    # k == N still returns every token although duplicates sit at distance 0 from a picked one
    assert get_method("divprune")().select(signals, 9).indices.tolist() == [list(range(9))]


def test_divprune_first_pick_is_most_isolated():
    angles = torch.tensor([0.0, 10.0, 20.0, 120.0]) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], dim=-1).unsqueeze(0)
    signals = Signals(features=x, layout=Layout(grid=(2, 2)), num_layers=NUM_LAYERS, feature_layer=FEATURE_LAYER)
    assert get_method("divprune")().select(signals, 1).indices.tolist() == [[3]]
    # then the token farthest from 120 degrees, i.e. 0 degrees
    assert get_method("divprune")().select(signals, 2).indices.tolist() == [[0, 3]]
    assert get_method("divprune")().select(signals, 3).indices.tolist() == [[0, 2, 3]]


def test_divprune_ties_go_to_lowest_index():
    x = torch.ones(1, 5, 3)
    assert maxmin_select(cosine_distances(x), 2).tolist() == [[0, 1]]


# ---------------------------------------------------------------------------------------------------- fastervlm


def test_fastervlm_keeps_top_k_of_head_mean():
    attention = torch.tensor([[[0.1, 0.5, 0.0, 0.2, 0.1, 0.1], [0.3, 0.0, 0.1, 0.4, 0.2, 0.0]]])  # [1, 2, 6]
    # head means: 0.2, 0.25, 0.05, 0.3, 0.15, 0.05 -> top 3 = {0, 1, 3}
    signals = Signals(
        features=torch.randn(1, 6, 4),
        layout=Layout(grid=(2, 3)),
        num_layers=NUM_LAYERS,
        feature_layer=FEATURE_LAYER,
        cls_attention={FEATURE_LAYER - 1: attention, 2: attention.flip(-1)},
    )
    sel = get_method("fastervlm")().select(signals, 3)
    assert sel.indices.tolist() == [[0, 1, 3]]
    torch.testing.assert_close(sel.scores, attention.mean(1))
    assert get_method("fastervlm")().request(24, 23).cls_attention == (22,)
    other = get_method("fastervlm")(layer=2)
    assert other.request(NUM_LAYERS, FEATURE_LAYER).cls_attention == (2,)
    assert other.select(signals, 3).indices.tolist() == [[2, 4, 5]]
    with pytest.raises(ValueError, match="layer"):
        get_method("fastervlm")(layer=-1)


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


# ------------------------------------------------------------------------------------------------------- random


def test_random_seed_controls_the_subset():
    signals = make_signals()
    a = get_method("random")(seed=0).select(signals, 7).indices
    b = get_method("random")(seed=0).select(signals, 7).indices
    c = get_method("random")(seed=1).select(signals, 7).indices
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[0], a[1])  # one subset for the whole batch
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(get_method("random")(seed=0).select(signals, 7).indices, a)
    with pytest.raises(ValueError, match="seed"):
        get_method("random")(seed="0")


def test_evocut_defaults_rank_an_odd_mover_first_among_eight_groups():
    """LLaVA-1.5 shapes at the paper's defaults: 576 patches moving along 8 shared directions, one that does not."""
    g = torch.Generator().manual_seed(7)
    n, d, layers, special = 576, 64, 24, 300
    group = torch.arange(n) * 8 // n  # eight raster blocks of 72 tokens
    states = [torch.randn(1, n, d, generator=g)]
    for _ in range(layers):
        dirs = torch.nn.functional.normalize(torch.randn(8, d, generator=g), dim=-1)
        step = dirs[group] + 0.05 * torch.randn(n, d, generator=g)
        # the odd token moves orthogonally to all eight group directions
        odd = torch.randn(d, generator=g)
        odd = odd - dirs.T @ torch.linalg.lstsq(dirs.T, odd).solution
        step[special] = torch.nn.functional.normalize(odd, dim=0)
        states.append(states[-1] + step.unsqueeze(0))
    method = get_method("evocut")()
    req = method.request(layers, layers - 1)
    signals = Signals(
        features=torch.randn(1, n, d, generator=g),
        layout=Layout((24, 24)),
        num_layers=layers,
        feature_layer=layers - 1,
        hidden_states={i: states[i] for i in req.hidden_states},
    )
    sel = method.select(signals, 1)
    assert sel.indices.tolist() == [[special]]
    assert float(sel.scores[0, special]) > 5 * float(sel.scores[0].topk(2).values[1])


# ------------------------------------------------------------------------------------------- vtc_cls, hiprune


def test_vtc_cls_sums_cls_attention_over_its_layers():
    signals = make_signals()
    sel = run("vtc_cls", signals, 7, start_layer=2, end_layer=4)
    total = sum(signals.cls_attention[i].mean(dim=1) for i in (2, 3, 4))
    for b in range(B):
        assert sel.indices[b].tolist() == sorted(total[b].topk(7).indices.tolist())
    # defaults: layers num_layers // 2 .. the one producing the features (3..4 here), as the official code sums
    # every attention map but the last (CLIP-L read at hidden_states[-2]: layers up to 22 of 0..23)
    assert get_method("vtc_cls")().request(NUM_LAYERS, FEATURE_LAYER).cls_attention == (3, 4)
    assert get_method("vtc_cls")(start_layer=12).request(24, 23).cls_attention == tuple(range(12, 23))


def test_hiprune_keeps_anchors_their_neighbours_then_registers():
    signals = make_signals()
    rows, cols = GRID
    obj, out = 1, 4
    signals.attention_received[out][:] = torch.linspace(0, 1, N)  # registers: the last patches first
    for anchor, buffers in (
        (2 * cols + 3, {2 * cols + 2, 2 * cols + 4, cols + 3, 3 * cols + 3}),  # inside: the four neighbours
        (cols, {cols - 1, cols + 1, 0, 2 * cols}),  # left edge: "left" wraps to the end of the row above
        (cols - 1, {cols - 2, cols, 0, 2 * cols - 1}),  # top-right corner: "right" wraps, "up" is clamped to 0
        (0, {1, cols}),  # top-left corner: "left" and "up" are clamped onto the anchor itself
        (N - 1, {N - 2, N - 1 - cols}),  # bottom-right corner: "right" and "down" are clamped onto the anchor
        (N - 3, {N - 4, N - 2, N - 3 - cols, N - 1}),  # bottom row: "down" is clamped to the last patch
    ):
        signals.attention_received[obj][:] = 0.01
        signals.attention_received[obj][:, anchor] = 1.0
        # k = 10, alpha = 0.5: round(10 * 0.5 / 5) = 1 anchor
        sel = run("hiprune", signals, 10, object_layer=obj, output_layer=out, alpha=0.5)
        chosen = {anchor} | buffers
        rest = [i for i in range(N) if i not in chosen]
        registers = set(rest[len(rest) - (10 - len(chosen)) :])
        for b in range(B):
            assert set(sel.indices[b].tolist()) == chosen | registers


def _official_hiprune(shallow, deep, k, alpha, width):
    """The official LLaVA selection written out from its description, on one image's received attention [N]:
    ``round(k * alpha / 5)`` anchors, their +-1 and +-width raster neighbours clamped to the grid, de-duplicated,
    then the best of the rest by output-layer attention (chosen patches lowered by 1)."""
    n = shallow.shape[0]
    anchors = torch.topk(shallow, round(k * alpha / 5)).indices
    near = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1).unique()
    deep = deep - torch.zeros(n).index_fill(0, near, 1)
    return sorted(torch.cat([near, torch.topk(deep, k - near.numel()).indices]).tolist())


@pytest.mark.parametrize("grid", [(24, 24), (5, 7)])
def test_hiprune_keeps_what_the_official_selection_keeps(grid):
    """Random received attention (peaked, so anchors often sit on the border), budgets on both sides of 25 where
    the anchor count drops to zero: the kept sets equal the official selection's."""
    n = grid[0] * grid[1]
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        sig = make_signals(seed=seed, b=1, grid=grid)
        shallow = (torch.randn(1, n, generator=g) * 3).softmax(-1)
        edge = [i for i in range(n) if i % grid[1] in (0, grid[1] - 1) or i // grid[1] in (0, grid[0] - 1)]
        shallow[0, edge[seed % len(edge)]] = 1.0  # the strongest anchor on the border
        deep = (torch.randn(1, n, generator=g) * 2).softmax(-1)
        sig.attention_received = {1: shallow, 4: deep}
        for k in sorted({3, 20, 25, 26, min(64, n), min(128, n), min(192, n)}):
            for alpha in (0.1, 0.5):  # anchors and buffers never exceed k (the official code fails then)
                sel = run("hiprune", sig, k, object_layer=1, output_layer=4, alpha=alpha)
                assert sel.indices[0].tolist() == _official_hiprune(shallow[0], deep[0], k, alpha, grid[1])


def test_hiprune_overflowing_anchors_and_buffers_keep_anchors_then_the_strongest_buffers():
    """alpha = 5 makes every slot an anchor's worth: anchors and buffers exceed k (the official code fails there);
    the anchors stay and the rest of k goes to buffers by object-layer attention."""
    sig = make_signals(b=1)
    obj = torch.linspace(1, 0, N)[None]  # object-layer attention falls with the raster index
    sig.attention_received = {1: obj, 4: torch.rand(1, N)}
    sel = run("hiprune", sig, 3, object_layer=1, output_layer=4, alpha=5.0)  # 3 anchors: 0, 1, 2
    assert sel.indices.tolist() == [[0, 1, 2]]
    sel = run("hiprune", sig, 2, object_layer=1, output_layer=4, alpha=2.5)  # 1 anchor (0), buffers 1 and 6
    assert sel.indices.tolist() == [[0, 1]]


def test_topk_sorted_orders_close_scores_by_value_and_exact_ties_by_index():
    from tokensieve.methods.base import topk_sorted

    assert topk_sorted(torch.tensor([[1e-12, 1.5e-12]]), 1).tolist() == [[1]]  # distinct, however close
    assert topk_sorted(torch.tensor([[2.0, 1e-13, 3e-13, 2e-13]]), 2).tolist() == [[0, 2]]
    assert topk_sorted(torch.tensor([[0.5, 1.0, 0.5, 1.0, 0.5]]), 3).tolist() == [[0, 1, 3]]  # ties: lower index
    assert topk_sorted(torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float16), 2).tolist() == [[0, 1]]
