"""Conformance, outputs: keep-all equals vanilla, a padded batch equals each sample's own call, cached decoding
equals a no-cache recompute, on every family (``conformance.FAMILIES``)."""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.methods import get_method
from tokensieve.methods.base import IN_ENCODER, IN_LLM

from .conformance import (
    FAMILIES,
    IN_LLM_PARAMS,
    LAYERS,
    Replay,
    generate,
    layer_hooks,
    logits,
    pairs,
    placeholders,
    right_padded,
    runnable,
    sieve_for,
    vanilla,
)


def _keep_all_params():
    out = []
    for name, family in FAMILIES.items():
        for method in runnable(family):
            for budget in [1.0] + ([family.fixed_tokens] if family.fixed_tokens else []):
                out.append(pytest.param(name, method, budget, id=f"{name}-{method}-{budget}"))
    return out


@pytest.mark.parametrize("fam,method,budget", _keep_all_params(), indirect=["fam"])
def test_keep_all_equals_vanilla(fam, method, budget):
    """Every method the family runs, at budget 1.0 (and at the int count where every image has the same one): the
    vanilla logits and greedy tokens, every entry keeps all its tokens, every decoder layer sees them all, and no
    hook stays on the decoder layers."""
    model, batch = fam.model, fam.make()
    ref, ref_gen = vanilla(fam)
    sieve = Sieve(method, budget, **IN_LLM_PARAMS.get(method, {}))
    with sieve(model):
        got, got_gen = logits(model, batch), generate(model, batch)
    report = sieve.last_report
    counts = placeholders(model, batch)
    assert [im.tokens_out for im in report.images] == [im.tokens_in for im in report.images]
    assert [sum(im.tokens_out for im in report.images if im.sample == b) for b in range(2)] == counts
    assert report.llm_layer_visual_tokens == [[n] * LAYERS for n in counts]
    assert report.method == method and report.budget == str(sieve.budget)
    assert report.stage.split("+")[0] == get_method(method).stage
    if fam.family.in_encoder_exact or get_method(method).stage != IN_ENCODER:
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert torch.equal(got_gen, ref_gen)
    assert layer_hooks(model) == 0


# ------------------------------------------------------------------------------------------------------ batches


def _batch_equals_singles(fam, batch, spec, budget):
    """A sieved batch against each sample's own sieved call: the same greedy answers (generation on a left-padded
    shrunk batch, the caller's prompt handed back in front), the same kept tokens and per-layer counts, the same
    logits on the real positions; returns the forward report."""
    model = fam.model
    singles = [fam.make(i) for i in range(2)]
    sieve = sieve_for(spec, budget)
    with sieve(model):
        together = logits(model, batch)
        report = sieve.last_report
        alone = [(logits(model, x)[0], sieve.last_report) for x in singles]
        out = generate(model, batch, n=4)
        left = sieve.last_report.attention_mask
        answers = [generate(model, x, n=4)[0, x["input_ids"].shape[1] :] for x in singles]
    assert bool(left[:, -1].all()), "generation ran on a left-padded shrunk batch"
    n_in = batch["input_ids"].shape[1]
    assert torch.equal(out[:, :n_in], batch["input_ids"]), "the caller's own prompt comes back in front"
    for b, ans in enumerate(answers):
        assert torch.equal(out[b, n_in:], ans)
    for b, (_, rep) in enumerate(alone):
        mine = [im for im in report.images if im.sample == b]
        assert [im.kept_indices for im in mine] == [im.kept_indices for im in rep.images]
        assert [im.tokens_out for im in mine] == [im.tokens_out for im in rep.images]
        assert report.llm_layer_visual_tokens[b] == rep.llm_layer_visual_tokens[0]
    try:
        for b, (single, _) in enumerate(alone):
            if report.llm_kept_positions:  # in-LLM: the logits follow the last layer's slots
                pos = report.llm_kept_positions[b]
                real = (pos >= 0) & (report.attention_mask[b][pos.clamp(min=0)] == 1)
            else:
                real = report.attention_mask[b].bool()
            torch.testing.assert_close(together[b][real], single, rtol=1e-4, atol=1e-4)
    except AssertionError:
        if spec == "dart":
            pytest.xfail(DART_FORWARD)
        raise
    return report


DART_FORWARD = (
    "known: forward() on a left-padded batch numbers positions through the padding (generate() does not), and "
    "DART ranks its pivots by L1 norms of post-RoPE keys, which depend on the absolute position; on families "
    "without their own position ids (all but Qwen) a padded sample can keep other tokens than alone"
)


@pytest.mark.parametrize(
    "fam,method", pairs(["evocut", "divprune", "visionzip", "evoprune", "fastv", "dart"]), indirect=["fam"]
)
def test_padded_batch_equals_single_calls(fam, method):
    batch = fam.make()
    assert bool((batch["attention_mask"][:, 0] == 0).any()), "the two samples should need padding"
    report = _batch_equals_singles(fam, batch, method, 0.6)
    if report.llm_kept_positions:  # the in-LLM stage pruned something
        assert report.llm_layer_visual_tokens[0][0] > report.llm_layer_visual_tokens[0][-1]


@pytest.mark.parametrize("fam,method", pairs(["evocut", "evocut+fastv"]), indirect=["fam"])
def test_right_padded_batch_equals_single_calls(fam, method):
    """A right-padded batch: forward() keeps the caller's right padding, generate() answers what each prompt answers
    alone (the shrunk prompt is re-padded on the left for generation), a pre-LLM stage alone and chained with an
    in-LLM one."""
    batch = right_padded(fam.make())
    assert bool((batch["attention_mask"][:, -1] == 0).any()) and bool(batch["attention_mask"][:, 0].all())
    report = _batch_equals_singles(fam, batch, method, 0.6)
    assert not bool(report.attention_mask[:, -1].all()), "forward keeps the caller's right padding"


# ------------------------------------------------------------------------------------------------------- caches


@pytest.mark.parametrize("fam,method", pairs(["divprune", "fastv", "pdrop", "dart"]), indirect=["fam"])
def test_cached_decoding_equals_no_cache_recompute(fam, method):
    """Greedy generate with the KV cache == step-by-step recompute without cache, under the same pruning: the
    padded batch for a pre-LLM method; sample 1 alone for an in-LLM one, its selections replayed (in-LLM ones
    read the text, which grows)."""
    model = fam.model
    if get_method(method).stage == IN_LLM:
        inputs = fam.make(1)
        replay = Replay(sieve_for(method, 0.6).llm_method)
        sieve = Sieve(replay, 0.6)
    else:
        inputs, replay, sieve = fam.make(), None, Sieve(method, 0.6)
    with sieve(model):
        out = generate(model, inputs, n=4, return_dict_in_generate=True, output_logits=True)
    if replay is not None:
        replay.recording = False
        lengths = [out.past_key_values.layers[i].get_seq_length() for i in range(LAYERS)]
        assert lengths[0] > lengths[-1]  # pruned layers hold fewer entries
    seq, n_prompt = out.sequences, inputs["input_ids"].shape[1]
    with sieve(model):
        for t in range(seq.shape[1] - n_prompt):
            ids = seq[:, : n_prompt + t]
            grown = torch.nn.functional.pad(inputs["attention_mask"], (0, t), value=1)
            extra = {}
            if "mm_token_type_ids" in inputs:  # Qwen's processor output: generated tokens are text (type 0)
                extra["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, t))
            step = logits(model, dict(inputs, input_ids=ids, attention_mask=grown, **extra), use_cache=False)
            torch.testing.assert_close(step[:, -1], out.logits[t], rtol=1e-4, atol=1e-4)
