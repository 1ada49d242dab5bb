"""The in-encoder stage on the tiny model: cuts between CLIP layers against a by-hand reference, batches, budgets,
merging mass, determinism, layer skipping and hook hygiene; then the in-encoder selectors on hand-made states."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tokensieve import Budget, Sieve
from tokensieve.adapters import get_adapter
from tokensieve.engine.encoder_stage import run_encoder_stage
from tokensieve.methods import get_method
from tokensieve.methods.base import EncoderCut, EncoderMethod, EncoderPlan, EncoderState, Layout, keep_with_cls
from tokensieve.methods.evoprune import EvoPrune
from tokensieve.methods.flowcut import FlowCut, flowcut_scores, normalised_entropy

from .conftest import N_TOKENS, batch_and_singles, prompt

IN_ENCODER = ["evoprune", "flowcut"]
FL = 5  # tiny: 6 CLIP layers, LLaVA reads hidden_states[-2] = hidden_states[5]


def logits(model, inputs):
    with torch.inference_mode():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def sharp(tiny):
    """The tiny model with sharpened vision attention (q scaled up), so CLS attention is far from uniform.

    FlowCut's entropy-adaptive count is ~0 on near-uniform attention (random weights); this makes it cut at
    intermediate layers, by different amounts per image, which the batch test needs.
    """
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
    return model


def _heads(x, attn):
    b, t, _ = x.shape
    return x.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)


def reference_encode(model, method: EncoderMethod, pixel_values, target):
    """CLIP layers run one by one with eager attention written out, cutting with ``method.cut`` on signals taken
    from the full attention map; returns projected features, kept positions, sizes and the trace."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    plan = method.plan(len(layers), FL)
    trace = [0] * len(layers)
    with torch.inference_mode():
        h = tower.pre_layrnorm(tower.embeddings(pixel_values))
        b = h.shape[0]
        positions = torch.arange(-1, N_TOKENS).expand(b, -1)
        sizes = torch.ones(b, N_TOKENS + 1)
        memory: dict = {}
        for i in range(FL):
            trace[i] = h.shape[1]
            layer, attn = layers[i], layers[i].self_attn
            x = layer.layer_norm1(h)
            q, k, v = (_heads(p(x), attn) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
            a = attn.out_proj((probs @ v).transpose(1, 2).reshape(b, h.shape[1], -1))
            h = h + a
            h = h + layer.mlp(layer.layer_norm2(h))
            if i in plan.layers and h.shape[1] - 1 > target:
                state = EncoderState(
                    layer=i,
                    num_layers=len(layers),
                    feature_layer=FL,
                    layout=Layout((8, 8), 1),
                    hidden=h,
                    sizes=sizes,
                    positions=positions,
                    target=target,
                    cls_attention=probs[:, :, 0],
                    keys=k,
                    values=v,
                    memory=memory,
                )
                cut = method.cut(state)
                if cut is not None:
                    positions = torch.gather(positions, 1, cut.keep)
                    sizes = cut.sizes if cut.sizes is not None else torch.gather(sizes, 1, cut.keep)
                    h = (
                        cut.hidden
                        if cut.hidden is not None
                        else torch.gather(h, 1, cut.keep[..., None].expand(-1, -1, h.shape[-1]))
                    )
        feats = model.model.multi_modal_projector(h[:, 1:])
    return feats, positions[:, 1:], sizes[:, 1:], trace


def encode(model, method, k, pixel_values):
    with torch.inference_mode():
        return get_adapter(model).encode(method, Budget.parse(k), {"pixel_values": pixel_values})


@pytest.mark.parametrize("method", IN_ENCODER)
@pytest.mark.parametrize("k", [16, 5])
def test_matches_layer_by_layer_reference(tiny, sharp, images, method, k):
    _, processor = tiny
    pv = processor(images=images[:2], text=[prompt(processor, "x")] * 2, return_tensors="pt")["pixel_values"]
    for model in (tiny[0], sharp):
        m = get_method(method)()
        enc = encode(model, m, k, pv)
        for i in range(2):  # one image at a time: flowcut's counts are per image
            feats, pos, sizes, trace = reference_encode(model, m, pv[i : i + 1], k)
            assert enc.images[i].kept_indices == pos[0].tolist()
            assert enc.images[i].tokens_out == k
            torch.testing.assert_close(enc.features[i], feats[0], atol=1e-5, rtol=1e-4)
            assert enc.images[i].merged == int((sizes[0] > 1).sum())
        if len(pv) == 1 or method == "evoprune":
            assert enc.encoder_layer_tokens[:FL] == trace[:FL]
        assert enc.encoder_layer_tokens[FL:] == [0]  # layer 5 feeds nothing LLaVA reads: skipped


def test_evoprune_schedule_is_geometric(tiny, single):
    model, _ = tiny
    sieve = Sieve("evoprune", 16)
    with sieve(model):
        logits(model, single)
    # layers 1 and 3 (start = 6 // 4, step 2): 64 -> 64 * (16/64)^(1/2) = 32 -> 16 patches, CLS on top
    assert sieve.last_report.encoder_layer_tokens == [65, 65, 33, 33, 17, 0]
    assert sieve.last_report.images[0].merged > 0


@pytest.mark.parametrize("method", IN_ENCODER)
def test_sieved_logits_are_the_reference_features_through_the_lm(tiny, single, method):
    model, _ = tiny
    sieve = Sieve(method, 12)
    with sieve(model):
        got = logits(model, single)
    report = sieve.last_report
    feats, *_ = reference_encode(model, get_method(method)(), single["pixel_values"], 12)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.inference_mode():
        ref = model(
            input_ids=report.input_ids,
            attention_mask=report.attention_mask,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[feats[0]])},
        ).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", IN_ENCODER)
def test_batch_equals_single_images_with_per_image_counts(tiny, sharp, images, method):
    _, processor = tiny
    texts = [prompt(processor, "what is in the picture ?"), prompt(processor, "how many cats are on the couch ?")]
    batch = processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
    singles = [processor(images=[images[i]], text=[texts[i]], return_tensors="pt") for i in range(2)]
    batch_logits, report, single_logits, single_reports = batch_and_singles(sharp, Sieve(method, 10), batch, singles)
    traces = [r.encoder_layer_tokens for r in single_reports]
    if method == "flowcut":  # the point of the test: intermediate counts really differ between the images
        assert traces[0] != traces[1] and max(traces[0][2:FL]) < 65  # the first cut is after layer 1
    mask = report.attention_mask.bool()
    for b in range(2):
        assert report.images[b].tokens_out == 10
        assert report.images[b].kept_indices == single_reports[b].images[0].kept_indices
        torch.testing.assert_close(batch_logits[b][mask[b]], single_logits[b][0], atol=1e-5, rtol=1e-4)
    # the batch trace is the images' mean, so trace x images is the total work
    assert report.encoder_layer_tokens == [round((a + b) / 2) for a, b in zip(*traces)]


@pytest.mark.parametrize("method", IN_ENCODER)
@pytest.mark.parametrize("k", [1, 7, 33, 63])
def test_final_count_equals_budget(sharp, tiny, images, method, k):
    _, processor = tiny
    pv = processor(images=images, text=[prompt(processor, "x")] * 3, return_tensors="pt")["pixel_values"]
    enc = encode(sharp, get_method(method)(), k, pv)
    assert [f.shape[0] for f in enc.features] == [k, k, k]
    for im in enc.images:
        assert len(im.kept_indices) == k and im.kept_indices == sorted(set(im.kept_indices))
    assert enc.encoder_layer_tokens[FL - 1] >= k + 1 and enc.encoder_layer_tokens == sorted(
        enc.encoder_layer_tokens[:FL], reverse=True
    ) + [0]


def test_merging_conserves_mass(tiny, images):
    model, processor = tiny
    pv = processor(images=images[:2], text=[prompt(processor, "x")] * 2, return_tensors="pt")["pixel_values"]
    adapter = get_adapter(model)
    method = EvoPrune(start_layer=0, step=1)  # four merge events, each composing with the previous ones
    plan = method.plan(6, FL)
    assert plan.layers == (0, 1, 2, 3, 4)
    with torch.inference_mode():
        res = run_encoder_stage(
            adapter.layers,
            adapter._attention_parts,
            method,
            plan,
            Layout((8, 8), 1),
            6,
            feature_layer=FL,
            record=[FL],
            run=lambda x: model.model.vision_tower(x, return_dict=True),
            pixel_values=pv,
        )
    for sizes, pos in zip(res.sizes, res.positions):
        assert sizes.shape == (7,) and float(sizes.sum()) == N_TOKENS + 1 and float(sizes[0]) == 1
        assert int(pos[0]) == -1 and bool((pos[1:] >= 0).all())
        assert float(sizes[1:].max()) > 2  # some token absorbed tokens that had absorbed others


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


@pytest.mark.parametrize("method", IN_ENCODER)
def test_deterministic(sharp, tiny, single, method):
    runs = []
    for _ in range(2):
        sieve = Sieve(method, 9)
        with sieve(sharp):
            runs.append((logits(sharp, single), sieve.last_report.images[0].kept_indices))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


@pytest.mark.parametrize("method", IN_ENCODER)
def test_skipping_unused_layers_changes_no_output(tiny, single, method):
    model, _ = tiny
    out = {}
    for skip in (True, False):
        sieve = Sieve(method, 12, skip_unused_layers=skip)
        with sieve(model):
            out[skip] = (logits(model, single), sieve.last_report.encoder_layer_tokens)
    assert torch.equal(out[True][0], out[False][0])
    assert out[True][1][:FL] == out[False][1][:FL] and out[True][1][FL] == 0 and out[False][1][FL] == 13


class _Boom(EncoderMethod):
    name = "boom"
    description = "raises at its layer"

    def plan(self, num_layers, feature_layer):
        return EncoderPlan((2,), cls_attention=True, values=True)

    def cut(self, state):
        raise RuntimeError("boom")


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.vision_tower.modules())


def test_hooks_are_removed_when_a_cut_raises(tiny, single):
    model, _ = tiny
    ref = logits(model, single)
    before = _hook_count(model)
    with Sieve(_Boom(), 8)(model):
        with pytest.raises(RuntimeError, match="boom"):
            logits(model, single)
        assert _hook_count(model) == before
    assert _hook_count(model) == before
    assert torch.equal(logits(model, single), ref)


def test_bad_cuts_and_schedules_are_clear_errors(tiny, single):
    model, _ = tiny
    before = _hook_count(model)

    class Short(_Boom):
        def cut(self, state):  # leaves more patches than the target at its last layer
            return EncoderCut(keep_with_cls(torch.arange(state.target + 3).expand(state.hidden.shape[0], -1)))

    with Sieve(Short(), 8)(model):
        with pytest.raises(ValueError, match="target is 8"):
            logits(model, single)
    with pytest.raises(ValueError, match=r"end_layer=5 must be in \[0, 4\]"):  # hidden_states[5] is layer 4's output
        Sieve("evoprune", 8, end_layer=5).apply(model)
    with pytest.raises(ValueError):
        Sieve("evoprune", 8, w_att=-1)
    with pytest.raises(ValueError):
        Sieve("flowcut", 8, ema=1.5)
    assert _hook_count(model) == before


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


def test_flowcut_on_a_24_layer_tower_cuts_after_layer_1_and_feeds_the_feature_layer_the_target(images):
    """A CLIP tower of CLIP-L's depth (24 layers, LLaVA reads hidden_states[-2]), attention sharpened so the
    entropy-adaptive counts are not zero: the per-layer trace shows the official schedule."""
    from tokensieve.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(image_size=32, patch_size=4, vision_layers=24, text_layers=2)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(200.0)
    inputs = processor(images=[images[1]], text=[prompt(processor, "x")], return_tensors="pt")
    sieve = Sieve("flowcut", 8)
    with sieve(model):
        logits(model, inputs)
    trace = sieve.last_report.encoder_layer_tokens
    assert trace[0] == trace[1] == N_TOKENS + 1  # nothing is cut after layer 0 (rpl = 21, odd)
    assert trace[2] < trace[1]  # the first cut is after layer 1 (rpl = 20)
    assert all(trace[i] == trace[i + 1] for i in range(2, 22, 2))  # and then after every second layer only
    assert trace[22] == 8 + 1 and trace[23] == 0  # layer 22 produces the features from the target; 23 is skipped


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
