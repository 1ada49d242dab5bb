"""The in-encoder selectors on hand-made encoder states: EvoPrune's size-weighted merge, FlowCut's schedule,
adaptive count and scores, and FlowCut against the official layer loop."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.methods.base import EncoderState, Layout
from tokensieve.methods.evoprune import EvoPrune
from tokensieve.methods.flowcut import FlowCut, flowcut_scores, normalised_entropy


def test_merge_is_size_weighted_mean():
    g = torch.Generator().manual_seed(0)
    b, n, d, h, hd = 2, 12, 8, 2, 4
    hidden = torch.randn(b, n + 1, d, generator=g)
    sizes = torch.cat([torch.ones(b, 1), torch.randint(1, 4, (b, n), generator=g).float()], dim=1)
    state = EncoderState(
        layer=3,
        num_layers=6,
        feature_layer=5,
        layout=Layout((3, 4), 1),
        hidden=hidden,
        sizes=sizes,
        positions=torch.arange(-1, n).expand(b, -1),
        target=4,
        cls_attention=torch.softmax(torch.randn(b, h, n + 1, generator=g), -1),
        keys=torch.randn(b, h, n + 1, hd, generator=g),
    )
    cut = EvoPrune(start_layer=3, end_layer=3).cut(state)  # the only event: straight to the target
    assert cut.keep.shape == (b, 5) and bool((cut.keep[:, 0] == 0).all())
    torch.testing.assert_close(cut.sizes.sum(1), sizes.sum(1))
    torch.testing.assert_close((cut.hidden * cut.sizes[..., None]).sum(1), (hidden * sizes[..., None]).sum(1))
    torch.testing.assert_close(cut.hidden[:, 0], hidden[:, 0])  # CLS is never merged into


# ----------------------------------------------------------------------------------------- flowcut on by-hand states


def _flow_state(layer, n=20, target=5, sharpness=0.0, seed=0, memory=None):
    g = torch.Generator().manual_seed(seed)
    logits_ = torch.randn(1, 2, n + 1, generator=g) * sharpness
    return EncoderState(
        layer=layer,
        num_layers=12,
        feature_layer=11,
        layout=Layout((4, 5), 1),
        hidden=torch.randn(1, n + 1, 8, generator=g),
        sizes=torch.ones(1, n + 1),
        positions=torch.arange(-1, n)[None],
        target=target,
        cls_attention=logits_.softmax(-1),
        values=torch.randn(1, 2, n + 1, 4, generator=g),
        memory={} if memory is None else memory,
    )


def test_flowcut_schedule_and_adaptive_count():
    method = FlowCut()
    assert method.plan(12, 11).layers == tuple(range(10))  # layer 10 produces hidden_states[11]: it runs pruned
    memory: dict = {}
    assert method.cut(_flow_state(0, memory=memory)) is None  # rpl = 11 - 2 - 0 = 9, odd: only the score moves
    first = memory["score"].clone()
    state = _flow_state(1, sharpness=4.0, memory=memory)  # rpl = 8: a cut
    r = float(normalised_entropy(state.cls_attention))
    expected = max(20 - round((20 - 5) / math.sqrt(8) * (1 - r * r)), 5)
    cut = method.cut(state)
    assert cut.keep.shape[1] - 1 == expected < 20
    assert memory["score"].shape == (1, expected)
    assert not torch.equal(memory["score"], first[:, :expected])
    flat = _flow_state(1, sharpness=0.0)
    assert float(normalised_entropy(flat.cls_attention)) > 0.99  # near-uniform attention: almost nothing goes
    final = method.cut(_flow_state(9, memory={}))  # rpl = 0: forced to the target
    assert final.keep.shape[1] - 1 == 5
    with pytest.raises(ValueError, match="no earlier layer"):
        method.plan(4, 1)


def test_flowcut_cuts_on_clip_l_after_the_official_layers():
    """CLIP-L read at hidden_states[-2] (index 23): the official loop counts the remaining layers from the layer
    producing the features (22), so it cuts after layers 1, 3, ..., 21 and layer 22 runs on the target."""
    method = FlowCut()
    assert method.plan(24, 23).layers == tuple(range(22))
    cuts = []
    for layer in method.plan(24, 23).layers:  # whether a layer cuts depends on its place only
        state = _flow_state(layer, n=60, target=8, sharpness=3.0, seed=layer)
        state.num_layers, state.feature_layer = 24, 23
        if method.cut(state) is not None:
            cuts.append(layer)
    assert cuts == list(range(1, 22, 2))


def _official_flowcut(att, values, target, num_layers, select_layer):
    """The official LLaVA-1.5 layer loop, written out from its description on per-layer signals of the *original*
    tokens (``att`` [L, 1+N] head-mean CLS rows, ``values`` [L, H, 1+N, hd]); a layer sees the rows that survived.

    ``rpl = select_layer - idx - 1``; while more than ``target`` patches remain the score is accumulated (0.5 EMA);
    at even ``rpl`` the count is ``max(N - P, T)`` (``T`` at ``rpl = 0``) and the top scores survive."""
    alive = torch.arange(att.shape[1] - 1)  # original patch ids still in the sequence
    cum = None
    for idx in range(num_layers):
        rpl = select_layer - idx - 1
        rows = torch.cat([torch.zeros(1, dtype=torch.long), alive + 1])
        if len(alive) <= target:
            continue
        cls = att[idx, rows][1:]
        v = values[idx][:, rows]
        sem = (v[:, :1] @ v.transpose(-1, -2)).squeeze(1).softmax(-1).mean(0)[1:]
        score = (cls / cls.sum() + sem / sem.sum()) * torch.norm(v.mean(0)[1:], p=1, dim=-1)
        cum = score if cum is None else 0.5 * cum + 0.5 * score
        if rpl % 2 == 0:
            if rpl:
                prob = cls / cls.sum()
                ratio = -(prob * prob.log()).sum() / torch.log(torch.tensor(len(alive)))
                drop = int(((len(alive) - target) / rpl**0.5 * (1 - ratio**2)).round())
            else:
                drop = len(alive)
            keep = torch.topk(cum, max(len(alive) - drop, target)).indices.sort().values
            alive, cum = alive[keep], cum[keep]
    return alive.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_flowcut_keeps_what_the_official_loop_keeps(seed):
    """Same per-layer signals through FlowCut.cut and through the official loop: the same surviving patches. One
    attention row carries almost no mass on the patches (the official plain-sum normalisation matters there)."""
    g = torch.Generator().manual_seed(seed)
    layers, feature, n, h, hd, target = 12, 11, 40, 2, 4, 6
    att = (torch.randn(layers, h, n + 1, generator=g) * 3).softmax(-1)
    att[3, :, 1:] *= 1e-14  # CLS keeps nearly all its attention at layer 3
    att[3, :, 0] = 1 - att[3, :, 1:].sum(-1)
    values = torch.randn(layers, h, n + 1, hd, generator=g)
    expected = _official_flowcut(att.mean(1), values, target, layers, feature - 1)
    method, memory, alive = FlowCut(), {}, torch.arange(n)
    for layer in method.plan(layers, feature).layers:
        if len(alive) == target:
            break  # the stage stops consulting the method once the target is reached
        rows = torch.cat([torch.zeros(1, dtype=torch.long), alive + 1])
        state = EncoderState(
            layer=layer,
            num_layers=layers,
            feature_layer=feature,
            layout=Layout((5, 8), 1),
            hidden=torch.zeros(1, len(rows), 8),
            sizes=torch.ones(1, len(rows)),
            positions=torch.cat([torch.tensor([-1]), alive])[None],
            target=target,
            cls_attention=att[layer][:, rows][None],
            values=values[layer][:, rows][None],
            memory=memory,
        )
        cut = method.cut(state)
        if cut is not None:
            alive = alive[cut.keep[0, 1:] - 1]
    assert alive.tolist() == expected


def test_flowcut_normalises_by_the_plain_sum_and_survives_a_zero_sum():
    g = torch.Generator().manual_seed(0)
    n = 6
    values = torch.randn(1, 2, n + 1, 4, generator=g)
    att = torch.rand(1, 2, n + 1, generator=g)
    att[:, :, 1:] *= 1e-20  # tiny but non-zero patch mass: divided by its own sum, as the official code does
    att[:, :, 0] = 1.0
    v = values.float()
    rel = (v[:, :, :1] @ v.transpose(-1, -2)).squeeze(-2).softmax(-1)[:, :, 1:].mean(1)
    a = att[:, :, 1:].mean(1)
    density = v[:, :, 1:].mean(1).abs().sum(-1)
    torch.testing.assert_close(flowcut_scores(att, values), (a / a.sum() + rel / rel.sum()) * density)
    uniform = torch.cat([torch.ones(1, 1, 1), torch.full((1, 1, n), 1e-20)], -1)
    assert float(normalised_entropy(uniform)) == pytest.approx(1.0)  # renormalised: uniform over the patches
    zero = att.clone()
    zero[:, :, 1:] = 0.0  # no mass at all: that term contributes nothing, the ranking stays finite
    scores = flowcut_scores(zero, values)
    assert bool(torch.isfinite(scores).all())
    torch.testing.assert_close(scores, rel / rel.sum() * density)
    assert float(normalised_entropy(zero)) == 1.0  # no distribution: counted as uniform, no intermediate cut
