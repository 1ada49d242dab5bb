"""FLOPs on every family against ``torch.utils.flop_counter``, at each call's real resolution.

Each family's tiny model runs the prompts of ``test_families_llm`` (images of different sizes and aspect ratios, so
anyres crop counts and Qwen's ``image_grid_thw`` differ per image; a video next to an image where the family takes
videos), one sample per call: FLOPs count real tokens, and a padded batch's LM also multiplies its padding. The
counter and the formula must agree exactly for vanilla ``generate`` (prefill and decoding), and for sieved calls
whose selectors do no matrix multiplication of their own: a pre-projector one (projector rows, re-projection), and
an in-encoder cut (per-layer attention segments after it, Qwen's cut ``cu_seqlens`` and windows, a stopped
encoder) chained with an in-LLM one (per-layer LM lengths).
"""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.methods.base import EncoderCut, EncoderMethod, EncoderPlan, LLMMethod, keep_with_cls
from tokensieve.methods.fastv import single_boundary
from tokensieve.tools.flops import count_flops, dims_from_config, trace_from_report, vanilla_trace

from ..tools.test_flops import counter
from .test_families_llm import FAMILIES, _build


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


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, make = _build(request.param)
    return request.param, model, make


def _generate(model, batch, n):
    with torch.inference_mode(), counter() as fc:
        model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return fc.get_total_flops()


def test_vanilla_generate_matches_the_counter_exactly(family):
    _, model, make = family
    for sample, new_tokens in ((0, 1), (1, 3)):
        batch = make(sample)
        measured = _generate(model, batch, new_tokens)
        flops = count_flops(model.config, vanilla_trace(model.config, **batch, new_tokens=new_tokens))
        assert flops.total == measured
        assert flops.vision > 0 and flops.projector > 0 and (flops.decode > 0) == (new_tokens > 1)


@pytest.mark.parametrize("method", ["random", "first-rows+first-slots"])
def test_sieved_generate_matches_the_counter_exactly(family, method):
    """``random`` selects before the projector (only kept tokens are projected, after the model projected them all
    on LLaVA-NeXT's path); the chain cuts inside the encoder after layer 0, then inside the LM after layer 1."""
    name, model, make = family
    batch = make(1)
    sieve = Sieve("random", 0.5) if method == "random" else Sieve([FirstRows(), FirstSlots()], [0.5, 0.6])
    with sieve(model):
        measured = _generate(model, batch, 2)
    report = sieve.last_report
    flops = count_flops(model.config, trace_from_report(report, new_tokens=2))
    assert flops.total == measured, (name, method, measured - flops.total)
    vanilla = count_flops(model.config, vanilla_trace(model.config, **batch, new_tokens=2))
    assert flops.prefill < vanilla.prefill
    if method != "random":  # later encoder layers ran on fewer rows, and the LM shrank after layer 1
        assert flops.vision < vanilla.vision
        assert sum(report.encoder_layer_segments[-1]) < sum(report.encoder_layer_segments[0])
        visual = report.llm_layer_visual_tokens[0]
        assert visual[0] > visual[1] == visual[-1]


def test_qwen_images_are_priced_at_their_own_grid():
    """Two images of different resolutions: the vision cost follows each one's image_grid_thw, not the config."""
    from tests.families import builders as F
    from tokensieve.models.tiny import demo_image

    model, proc = F.build_tiny_qwen("qwen2_vl")
    small = proc(["user : <image> what ? assistant :"], images=[demo_image(32, 0)])
    large = proc(["user : <image> what ? assistant :"], images=[demo_image(96, 0)])
    costs = []
    for batch in (small, large):
        trace = vanilla_trace(model.config, **batch)
        costs.append(count_flops(model.config, trace))
        assert costs[-1].total == _generate(model, batch, 1)
        assert trace.projected_tokens == int(batch["image_grid_thw"].prod()) // 4
    assert costs[1].vision > 4 * costs[0].vision
    assert dims_from_config(model.config).image_tokens is None  # no per-config image size to fall back to


def test_per_sample_traces_of_a_batch_equal_each_sample_alone(family):
    """``trace_from_report(report, sample=i)`` (per-question costs, as the lmms-eval wrapper reports them) splits
    the batch's counted encoder passes by sample; where the counted rows cannot be attributed to a sample (anyres
    paths that project every crop before the kept ones, Qwen's merger and windows) the split is refused instead of
    guessed."""
    name, model, make = family
    sieve = Sieve("random", 0.5)
    with sieve(model):
        with torch.inference_mode():
            model(**make())
        report = sieve.last_report
        alone = []
        for i in range(2):
            with torch.inference_mode():
                model(**make(i))
            alone.append(count_flops(model.config, trace_from_report(sieve.last_report)))
    if name != "idefics3":
        with pytest.raises(ValueError, match="price the whole batch"):
            trace_from_report(report, sample=0)
        return
    for i in range(2):
        split = count_flops(model.config, trace_from_report(report, sample=i))
        assert split.vision == alone[i].vision and split.projector == alone[i].projector
