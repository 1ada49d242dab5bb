"""Scoring selectors on hand-made tensors: EvoCut, DivPrune, FasterVLM, random, VTC-CLS and HiPrune."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.methods import Layout, Signals, get_method
from tokensieve.methods.divprune import cosine_distances, maxmin_select
from tokensieve.methods.evocut import evocut_scores

from .signals import FEATURE_LAYER, GRID, NUM_LAYERS, B, D, N, make_signals, run

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


def _per_row_hiprune(obj_att, out_att, k, alpha, cols):
    """HiPrune as it read before its rows were batched: one image at a time, anchors, neighbours, registers (or,
    when anchors and neighbours overflow k, anchors then the best buffers)."""
    from tokensieve.methods.base import topk_sorted

    n = obj_att.shape[-1]
    n_anchor = min(k, round(k * alpha / 5))
    out = []
    for o, d in zip(obj_att, out_att):
        anchors = topk_sorted(o[None], n_anchor)[0]
        near = torch.stack([anchors - 1, anchors + 1, anchors - cols, anchors + cols]).clamp(0, n - 1)
        chosen = torch.zeros(n, dtype=torch.bool).index_fill(0, anchors, True).index_fill(0, near.flatten(), True)
        extra = k - int(chosen.sum())
        if extra >= 0:
            rest = topk_sorted(d.masked_fill(chosen, float("-inf"))[None], extra)[0]
            out.append(sorted(chosen.nonzero().flatten().tolist() + rest.tolist()))
        else:
            scores = o.masked_fill(~chosen, float("-inf")).index_fill(0, anchors, float("-inf"))
            out.append(sorted(anchors.tolist() + topk_sorted(scores[None], k - n_anchor)[0].tolist()))
    return out


@pytest.mark.parametrize("k, alpha", [(10, 0.5), (20, 2.0), (12, 5.0), (30, 1.0), (4, 5.0)])
def test_hiprune_batched_rows_keep_what_one_image_at_a_time_keeps(k, alpha):
    """Rows whose register counts differ (and rows that overflow k) in one batch, no host reads per row."""
    g = torch.Generator().manual_seed(k)
    signals = make_signals()
    for layer in signals.attention_received:
        signals.attention_received[layer] = torch.rand(B, N, generator=g).round(decimals=2)  # ties too
    sel = run("hiprune", signals, k, object_layer=1, output_layer=4, alpha=alpha)
    want = _per_row_hiprune(signals.attention_received[1], signals.attention_received[4], k, alpha, GRID[1])
    assert sel.indices.tolist() == want
