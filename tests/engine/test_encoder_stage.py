"""The in-encoder stage on the tiny model: cuts between CLIP layers against a by-hand reference, batches, budgets,
merging mass, determinism, layer skipping, hook hygiene and FlowCut's schedule on a 24-layer tower (the selectors on
hand-made states: tests/methods/test_in_encoder_selectors.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from tokensieve import Budget, Sieve
from tokensieve.adapters import get_adapter
from tokensieve.engine.encoder_stage import run_encoder_stage
from tokensieve.methods import get_method
from tokensieve.methods.base import EncoderCut, EncoderMethod, EncoderPlan, EncoderState, Layout, keep_with_cls
from tokensieve.methods.evoprune import EvoPrune

from ..conftest import N_TOKENS, batch_and_singles, prompt

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
