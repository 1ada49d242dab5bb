"""Conformance, what reports measure: merging methods report their merge groups (``ImageReport.groups``), and FLOPs
equal ``torch.utils.flop_counter``, on every family.

``groups`` holds, per cell of an entry's report grid, an id of the output token the cell went into (-1: dropped);
``tokensieve show`` draws them. Merging methods: EvoPrune (in the encoder), VisionZip (contextual tokens) and pool
(every token created); keep-or-drop methods report ``None``.

FLOPs are counted one sample per call at its real resolution (anyres crop counts and Qwen's ``image_grid_thw``
differ per image; a video next to an image where the family takes videos): FLOPs count real tokens, and a padded
batch's LM also multiplies its padding. The counter and the formula must agree exactly for vanilla ``generate``
(prefill and decoding), and for sieved calls whose selectors do no matrix multiplication of their own: a
pre-projector one (projector rows, re-projection), and an in-encoder cut (per-layer attention segments after it,
Qwen's cut ``cu_seqlens`` and windows, a stopped encoder) chained with an in-LLM one (per-layer LM lengths).
"""

from collections import Counter

import pytest
import torch

from tokensieve import Sieve
from tokensieve.methods.base import EncoderCut, EncoderMethod, EncoderPlan, LLMMethod, keep_with_cls
from tokensieve.methods.fastv import single_boundary
from tokensieve.tools.flops import count_flops, trace_from_report, vanilla_trace

from ..tools.test_flops import counter
from .conformance import NAMES, pairs

# ------------------------------------------------------------------------------------------------- merge groups


def _run(model, inputs, method):
    sieve = Sieve(method, 0.5)
    with sieve(model), torch.inference_mode():
        model(**inputs)
    return sieve.last_report


@pytest.mark.parametrize("fam,method", pairs(["evoprune", "visionzip", "pool"]), indirect=["fam"])
def test_merging_methods_report_their_groups(fam, method):
    report = _run(fam.model, fam.make(1), method)
    assert report.images
    for im in report.images:
        assert im.groups is not None, (fam.name, method, im.image)
        assert len(im.groups) == im.grid[0] * im.grid[1]
        members = Counter(g for g in im.groups if g >= 0)
        assert all(im.groups[c] >= 0 for c in im.kept_indices)  # a kept position stands for its own token
        assert 0 < len(members) <= im.tokens_out
        assert any(n > 1 for n in members.values()), "a 2x smaller entry must have merged something"
        if method == "evoprune":  # a merged row is one that absorbed other patches (units, windows)
            assert sum(n > 1 for n in members.values()) == im.merged
        if method == "pool":  # every token is a window average; windows do not overlap
            assert len(members) == im.merged


@pytest.mark.parametrize("fam", NAMES, indirect=True)
def test_keep_or_drop_methods_report_no_groups(fam):
    model, inputs = fam.model, fam.make(1)
    assert all(im.groups is None for im in _run(model, inputs, "divprune").images)
    report = _run(model, inputs, Sieve("evoprune", 0.5, merge=False).method)
    assert all(im.groups is None for im in report.images)


# -------------------------------------------------------------------------------------------------------- FLOPs


class FirstRows(EncoderMethod):
    """Keeps the first ``target`` candidates after encoder layer 0: a cut with no matrix multiplication."""

    name = "first-rows"
    description = "test helper"

    def plan(self, num_layers, feature_layer):
        return EncoderPlan((0,))

    def cut(self, state):
        b = state.hidden.shape[0]
        return EncoderCut(keep_with_cls(torch.arange(state.target).expand(b, -1)))


class FirstSlots(LLMMethod):
    """Keeps the first visual tokens of each image from decoder layer 1 on: attention-free, no matmul."""

    name = "first-slots"
    description = "test helper"

    def schedule(self, n, num_layers, target):
        return single_boundary(n, num_layers, target, 1, self.name)

    def select_llm(self, signals, ks):
        return [torch.arange(k) for k in ks]


def _generate(model, batch, n):
    with torch.inference_mode(), counter() as fc:
        model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return fc.get_total_flops()


@pytest.mark.parametrize("fam", NAMES, indirect=True)
def test_vanilla_generate_matches_the_counter_exactly(fam):
    model = fam.model
    for sample, new_tokens in ((0, 1), (1, 3)):
        batch = fam.make(sample)
        measured = _generate(model, batch, new_tokens)
        flops = count_flops(model.config, vanilla_trace(model.config, **batch, new_tokens=new_tokens))
        assert flops.total == measured
        assert flops.vision > 0 and flops.projector > 0 and (flops.decode > 0) == (new_tokens > 1)
        assert flops.macs == flops.total // 2


@pytest.mark.parametrize("fam,method", pairs(["random", "first-rows+first-slots"]), indirect=["fam"])
def test_sieved_generate_matches_the_counter_exactly(fam, method):
    """``random`` selects before the projector (only kept tokens are projected, after the model projected them all
    on LLaVA-NeXT's path); the chain cuts inside the encoder after layer 0, then inside the LM after layer 1."""
    model, batch = fam.model, fam.make(1)
    sieve = Sieve("random", 0.5) if method == "random" else Sieve([FirstRows(), FirstSlots()], [0.5, 0.6])
    with sieve(model):
        measured = _generate(model, batch, 2)
    report = sieve.last_report
    flops = count_flops(model.config, trace_from_report(report, new_tokens=2))
    assert flops.total == measured, (fam.name, method, measured - flops.total)
    vanilla = count_flops(model.config, vanilla_trace(model.config, **batch, new_tokens=2))
    assert flops.prefill < vanilla.prefill
    if method != "random":  # later encoder layers ran on fewer rows, and the LM shrank after layer 1
        assert flops.vision < vanilla.vision
        assert sum(report.encoder_layer_segments[-1]) < sum(report.encoder_layer_segments[0])
        visual = report.llm_layer_visual_tokens[0]
        assert visual[0] > visual[1] == visual[-1]


@pytest.mark.parametrize("fam", NAMES, indirect=True)
def test_per_sample_traces_of_a_batch_equal_each_sample_alone(fam):
    """``trace_from_report(report, sample=i)`` (per-question costs, as the lmms-eval wrapper reports them) splits
    the batch's counted encoder passes by sample; where the counted rows cannot be attributed to a sample (anyres
    paths that project every crop before the kept ones, Qwen's merger and windows) the split is refused instead of
    guessed."""
    model = fam.model
    sieve = Sieve("random", 0.5)
    with sieve(model):
        with torch.inference_mode():
            model(**fam.make())
        report = sieve.last_report
        alone = []
        for i in range(2):
            with torch.inference_mode():
                model(**fam.make(i))
            alone.append(count_flops(model.config, trace_from_report(sieve.last_report)))
    if not fam.family.flops_split_by_sample:
        with pytest.raises(ValueError, match="price the whole batch"):
            trace_from_report(report, sample=0)
        return
    for i in range(2):
        split = count_flops(model.config, trace_from_report(report, sample=i))
        assert split.vision == alone[i].vision and split.projector == alone[i].projector
