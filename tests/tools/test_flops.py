"""FLOPs from the token trace against torch's own counter on the tiny model, and the paper conventions' algebra."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from tokensieve import Sieve
from tokensieve.errors import UnsupportedModelError
from tokensieve.models.archs import arch_config, synthetic_inputs
from tokensieve.tools.flops import (
    LMDims,
    TokenTrace,
    analytic_trace,
    count_flops,
    dims_from_config,
    fastv_eq5_macs,
    lm_layer_flops,
    pdrop_macs,
    trace_from_report,
    vanilla_trace,
    vision_layer_flops,
)


def _cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def counter():
    """FlopCounterMode with the CPU SDPA kernel counted (torch 2.13 has no formula for it and would skip attention)."""
    return FlopCounterMode(
        display=False,
        depth=None,
        custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa},
    )


def by_module(fc, suffix: str) -> int:
    hits = [sum(v.values()) for k, v in fc.get_flop_counts().items() if k.endswith(suffix)]
    assert len(hits) == 1, (suffix, hits)
    return hits[0]


@pytest.mark.parametrize("method", ["random", "divprune"])
def test_sieved_call_parts_match_the_counter(tiny, single, method):
    """Pre-projector methods project only kept tokens, post-projector ones all of them; the LM sees k either way."""
    model, _ = tiny
    sieve = Sieve(method, 16)
    with torch.inference_mode(), counter() as fc, sieve(model):
        model.generate(**single, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    flops = count_flops(model.config, trace_from_report(sieve.last_report, new_tokens=2))
    assert flops.vision == by_module(fc, "CLIPVisionModel")
    assert flops.projector == by_module(fc, "LlavaMultiModalProjector")
    lm = sum(by_module(fc, f"language_model.layers.{i}") for i in range(2))
    assert flops.prefill + flops.decode == lm + by_module(fc, "lm_head")
    if method == "random":  # no matmul in the selector: the whole call is accounted for
        assert flops.total == fc.get_total_flops()
    else:  # divprune's own N x N cosine-similarity matmul on the projected tokens is all the formula leaves out
        assert fc.get_total_flops() - flops.total == 2 * 64 * 64 * model.config.text_config.hidden_size
    vanilla = count_flops(model.config, vanilla_trace(model.config, single["input_ids"], new_tokens=2))
    assert (flops.projector == vanilla.projector) == (method == "divprune")


def test_each_layer_of_a_shrinking_trace_costs_what_the_counter_says_at_that_length(tiny):
    """A trace whose counts change with depth is priced layer by layer at the length that layer ran."""
    model, _ = tiny
    dims = dims_from_config(model.config)
    lm = model.model.language_model
    vis_layer = model.model.vision_tower.encoder.layers[0]
    measured_lm, measured_vis = {}, {}
    for n in (50, 17):
        with torch.inference_mode(), counter() as fc:
            lm(inputs_embeds=torch.randn(1, n, dims.lm.hidden), use_cache=False)
        measured_lm[n] = by_module(fc, "layers.1")
        with torch.inference_mode(), counter() as fc:
            vis_layer(torch.randn(1, n + 1, dims.vision.hidden), None)
        measured_vis[n + 1] = fc.get_total_flops()
    trace = TokenTrace(
        encoder_layer_tokens=[65, 65, 65, 51, 18, 18],
        num_images=1,
        projected_tokens=17,
        llm_layer_tokens=[[50, 17]],
        llm_layer_visual_tokens=[[40, 7]],
    )
    flops = count_flops(model.config, trace)
    assert flops.prefill_layers == [measured_lm[50], measured_lm[17]]
    assert vision_layer_flops(dims.vision, 51) == measured_vis[51]
    assert vision_layer_flops(dims.vision, 18) == measured_vis[18]
    full = count_flops(model.config, TokenTrace([65] * 6, 1, 17, [[50, 50]], [[40, 40]]))
    assert full.vision - flops.vision == (
        vision_layer_flops(dims.vision, 65) * 3
        - vision_layer_flops(dims.vision, 51)
        - 2 * vision_layer_flops(dims.vision, 18)
    )


def test_analytic_trace_equals_the_measured_one_for_a_pre_projector_method(tiny):
    """What `bench --flops-only` says for a 7B model is what a real run would record."""
    model, _ = tiny
    batch = synthetic_inputs(model, text_tokens=12)
    sieve = Sieve("evocut", 16)
    with torch.inference_mode(), sieve(model):
        model(**batch)
    measured = count_flops(model.config, trace_from_report(sieve.last_report))
    predicted = count_flops(model.config, analytic_trace(model.config, text_tokens=12, visual_tokens=16))
    assert measured.to_dict() == predicted.to_dict()


def test_padded_batch_counts_real_tokens_per_sample(tiny, images):
    model, processor = tiny
    from tests.conftest import prompt

    texts = [prompt(processor, "what ?"), prompt(processor, "what is in the picture on the left ?")]
    batch = processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
    trace = vanilla_trace(model.config, batch["input_ids"], batch["attention_mask"])
    assert trace.num_images == 2 and trace.projected_tokens == 128
    assert [t[0] for t in trace.llm_layer_tokens] == batch["attention_mask"].sum(1).tolist()
    assert [t[0] for t in trace.llm_layer_visual_tokens] == [64, 64]


def _lm(kv_heads=8, gated=True):
    return LMDims(
        hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=kv_heads, head_dim=64, vocab=1000, gated=gated
    )


@pytest.mark.parametrize("n", [1, 77, 616])
def test_paper_conventions_relate_to_true_flops(n):
    """Eq. 5 is exact MACs for multi-head attention with a 2-matrix MLP; PDrop's for a gated one; GQA only trims k/v."""
    assert lm_layer_flops(_lm(gated=False), n) == 2 * fastv_eq5_macs(_lm(), n)
    assert lm_layer_flops(_lm(gated=True), n) == 2 * pdrop_macs(_lm(), n)
    assert pdrop_macs(_lm(), n) - fastv_eq5_macs(_lm(), n) == n * 512 * 1376
    saved = lm_layer_flops(_lm(kv_heads=8), n) - lm_layer_flops(_lm(kv_heads=2), n)
    assert saved == 2 * 2 * n * 512 * (8 - 2) * 64  # k and v projections at a quarter of the width


def test_llava15_7b_from_config_alone_matches_published_orders():
    """No weights: LLaVA-1.5-7B at 576 + 40 tokens is ~3.2 T MACs by FastV's Eq. 5 (the number papers quote)."""
    config = arch_config("llava15-7b")
    batch = synthetic_inputs(config)
    full = count_flops(config, vanilla_trace(config, batch["input_ids"]))
    assert full.fastv_eq5_macs == 32 * fastv_eq5_macs(dims_from_config(config).lm, 616)
    assert 3.1e12 < full.fastv_eq5_macs < 3.3e12
    assert 380e9 < full.vision < 385e9  # CLIP-L/14-336, 24 layers at 577 tokens
    pruned = count_flops(config, analytic_trace(config, text_tokens=40, visual_tokens=64))
    assert 4 < full.to_first_token / pruned.to_first_token < 6


def test_clear_errors():
    from transformers import CLIPVisionConfig

    with pytest.raises(UnsupportedModelError, match="FLOPs are implemented for model types llava, llava_next"):
        dims_from_config(CLIPVisionConfig())
    config = arch_config("tiny")
    with pytest.raises(ValueError, match="decoder layers"):
        count_flops(config, TokenTrace([145] * 6, 1, 144, [[150]], [[144]]))
    ids = torch.full((1, 10), config.image_token_id)
    with pytest.raises(ValueError, match="whole number of images"):
        vanilla_trace(config, ids)


@pytest.mark.parametrize("method,budget", [("evocut", 16), ("divprune", 8), ("fastv+", [32, 20])])
def test_per_sample_traces_add_up_to_the_batch_and_equal_a_call_on_their_own(tiny, images, method, budget):
    """`trace_from_report(..., sample=i)` prices one question of a padded batch (two images in one sample) exactly
    as that question's own call is priced, and the samples add up to the batch: what per-question FLOPs in an
    lmms-eval run rely on."""
    model, processor = tiny
    from tests.conftest import prompt

    texts = [prompt(processor, "what ?", n_images=2), prompt(processor, "what is in the picture on the left ?")]
    groups = [images[:2], images[2:3]]
    batch = processor(images=groups[0] + groups[1], text=texts, return_tensors="pt", padding=True)
    if method == "fastv+":  # an in-LLM stage after layer 1 of the 2-layer LM, behind EvoCut
        from tokensieve.methods import get_method

        method = [get_method("evocut")(), get_method("fastv")(layer=1)]
    sieve = Sieve(method, budget)
    with torch.inference_mode(), sieve(model):
        model.generate(**batch, max_new_tokens=1, do_sample=False)
        report = sieve.last_report
        whole = count_flops(model.config, trace_from_report(report)).to_first_token
        parts = [count_flops(model.config, trace_from_report(report, sample=i)).to_first_token for i in range(2)]
        own = []
        for text, imgs in zip(texts, groups):
            model.generate(
                **processor(images=imgs, text=[text], return_tensors="pt"), max_new_tokens=1, do_sample=False
            )
            own.append(count_flops(model.config, trace_from_report(sieve.last_report)).to_first_token)
    assert sum(parts) == whole
    assert parts == own
    assert trace_from_report(report, sample=0).num_images == 2
