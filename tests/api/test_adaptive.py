"""Adaptive budgets: the rule and its calibration on hand-made curves, then on the tiny LLaVA (counts, mean,
batch independence, keep-all, refusals)."""

from __future__ import annotations

import pytest
import torch

import tokensieve
from tokensieve import Adaptive, Sieve
from tokensieve.adaptive import AdaptiveTarget, counts_at, coverage_residuals, fit, score_residuals
from tokensieve.budget import Budget
from tokensieve.errors import BudgetError, BudgetTypeError, StageError
from tokensieve.methods import IN_LLM, get_method, method_names
from tokensieve.methods.base import IN_ENCODER
from tokensieve.models.tiny import build_tiny_llava, demo_image

from ..conftest import N_TOKENS, TINY, batch_and_singles, prompt

ADAPTIVE_METHODS = [
    n for n in method_names() if get_method(n).stage not in (IN_LLM, IN_ENCODER) and get_method(n).any_count
]


# ------------------------------------------------------------------------------------------------ the budget value


def test_defaults_parse_and_str():
    a = Adaptive(64)
    assert (a.target(576).lo, a.target(576).mean, a.target(576).hi) == (16, 64, 192)
    assert a.target(144).hi == 144  # the default max is capped at the token count
    assert Adaptive.parse("adaptive:64") == a
    assert Adaptive.parse("adaptive:64:16:192") == Adaptive(64, 16, 192)
    assert Adaptive.parse(" Adaptive:0.25:0.1:0.5 ") == Adaptive(0.25, 0.1, 0.5)
    assert str(Adaptive(64, 16, 192)) == "adaptive:64:16:192" and str(a) == "adaptive:64"
    calibrated = Adaptive(64, 16, 192, threshold=0.012345678901234)
    assert Adaptive.parse(str(calibrated)) == calibrated  # a fitted budget round-trips through its text
    assert Adaptive.parse("adaptive:64@0.5") == Adaptive(64, threshold=0.5)
    assert Adaptive.parse("adaptive:64::100") == Adaptive(64, None, 100)
    assert Budget.parse("adaptive:36").value == Adaptive(36)
    r = Adaptive(0.25).target(144)
    assert (r.lo, r.mean, r.hi) == (9, 36, 108)
    assert isinstance(Budget.parse(Adaptive(8)).resolve(64), AdaptiveTarget)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: Adaptive(16, 32, 64), BudgetError, "below min"),
        (lambda: Adaptive(100, 16, 64), BudgetError, "above max"),
        (lambda: Adaptive(16, 0.1, 64), BudgetTypeError, "must all be ints"),
        (lambda: Adaptive(0.5, 0.6, 0.9), BudgetError, "below min"),
        (lambda: Adaptive(1.5), BudgetError, "keep ratio"),
        (lambda: Adaptive(0), BudgetError, "at least one"),
        (lambda: Adaptive("64"), BudgetTypeError, "int"),
        (lambda: Adaptive(64, criterion="entropy"), BudgetError, "criterion"),
        (lambda: Adaptive.parse("adaptive:64:16"), BudgetError, "MEAN:MIN:MAX"),
        (lambda: Adaptive.parse("adaptive:lots"), BudgetError, "not a number"),
        (lambda: Adaptive.parse("adaptive:64@high"), BudgetError, "threshold after '@'"),
        (lambda: Adaptive(64, 16, 600).target(576), BudgetError, "max of 600 tokens exceeds the 576"),
    ],
)
def test_impossible_settings_are_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ------------------------------------------------------------------------------------------------------- the rule


def test_coverage_residuals_fall_to_zero_and_flat_images_need_one_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 8, generator=g)
    x[1] = x[1, :1]  # image 1: every candidate identical
    r = coverage_residuals(x, 20)
    assert r.shape == (2, 20) and r.dtype == torch.float64
    assert bool((r[:, 1:] <= r[:, :-1] + 1e-12).all())
    assert float(r[0, -1]) == pytest.approx(0.0, abs=1e-6)
    assert float(r[1, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(r[0, 0]) > 0.5
    # three exact clusters: three picks cover everything
    y = torch.eye(3).repeat_interleave(4, 0).unsqueeze(0)
    assert float(coverage_residuals(y, 12)[0, 2]) == pytest.approx(0.0, abs=1e-6)
    assert float(coverage_residuals(y, 12)[0, 1]) > 0.2


def test_score_residuals_are_the_mass_left_out():
    s = torch.tensor([[0.5, 0.0, 0.3, 0.2], [-1.0, 1.0, 1.0, 0.0]])
    r = score_residuals(s, 4)
    torch.testing.assert_close(r[0], torch.tensor([0.5, 0.2, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(r[1], torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_fit_hits_the_mean_exactly_and_the_rule_reproduces_its_counts():
    g = torch.Generator().manual_seed(3)
    lo, mean, hi = 4, 12, 30
    curves = torch.rand(50, 40, generator=g, dtype=torch.float64).sort(dim=-1, descending=True).values
    curves = curves * torch.rand(50, 1, generator=g, dtype=torch.float64)  # images of different difficulty
    records = [(c[lo - 1 : hi - 1], lo, mean, hi) for c in curves]
    cal = fit(records)
    assert cal.achieved_mean == mean and cal.target_mean == mean and cal.sets == 50
    assert min(cal.counts) >= lo and max(cal.counts) <= hi and len(set(cal.counts)) > 5
    assert counts_at(curves, lo, hi, cal.threshold) == cal.counts
    # each image alone gets the same count: the rule reads nothing but its own curve
    assert [counts_at(c[None], lo, hi, cal.threshold)[0] for c in curves] == cal.counts
    # harder images (larger residual everywhere) never get fewer tokens
    harder = counts_at(curves * 2, lo, hi, cal.threshold)
    assert all(h >= c for h, c in zip(harder, cal.counts))
    # the extremes: mean == lo and mean == hi
    assert set(fit([(c[lo - 1 : hi - 1], lo, lo, hi) for c in curves]).counts) == {lo}
    assert set(fit([(c[lo - 1 : hi - 1], lo, hi, hi) for c in curves]).counts) == {hi}


# ------------------------------------------------------------------------------------------------ on the tiny LLaVA


@pytest.fixture(scope="module")
def calib(tiny):
    _, processor = tiny
    pics = [demo_image(size=96, seed=10 + s) for s in range(8)]
    return processor(
        images=pics, text=[prompt(processor, "what is in the picture ?")] * len(pics), return_tensors="pt", padding=True
    )


@pytest.fixture(scope="module")
def trio(tiny, images):
    _, processor = tiny
    texts = [
        prompt(processor, "what is in the picture ?"),
        prompt(processor, "how many cats are on the couch ?"),
        prompt(processor, "what ?"),
    ]
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    singles = [processor(images=[images[i]], text=[texts[i]], return_tensors="pt") for i in range(3)]
    return batch, singles


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_counts_respect_bounds_and_the_calibrated_mean(tiny, calib, method):
    model, _ = tiny
    sieve = Sieve(method, Adaptive(16, 4, 40))
    cal = sieve.calibrate(model, [calib])
    assert sieve.budget.value.threshold == cal.threshold
    assert cal.sets == 8 and cal.target_mean == 16
    assert cal.achieved_mean == 16  # exact on the calibration set (no residual ties on these images)
    assert all(4 <= c <= 40 for c in cal.counts)
    with sieve(model), torch.inference_mode():
        model(**calib)
    report = sieve.last_report
    counts = [im.tokens_out for im in report.images]
    assert counts == cal.counts  # the rule applied to the calibration images gives the fitted counts back
    assert sum(counts) / len(counts) == 16
    assert len(set(counts)) > 1, "the images should not all get the same count"
    assert [len(im.kept_indices) for im in report.images] == counts or method == "visionzip"
    n_out = (report.input_ids == model.config.image_token_id).sum().item()
    assert n_out == sum(counts)


@pytest.mark.parametrize("method", ["evocut", "vispruner", "divprune", "visionzip"])
def test_an_images_count_does_not_depend_on_its_batch(tiny, calib, trio, method):
    model, _ = tiny
    batch, singles = trio
    sieve = Sieve(method, Adaptive(12, 2, 40))
    sieve.calibrate(model, [calib])
    batch_logits, batch_report, single_logits, single_reports = batch_and_singles(model, sieve, batch, singles)
    mask = batch_report.attention_mask.bool()
    for b in range(3):
        assert batch_report.images[b].tokens_out == single_reports[b].images[0].tokens_out
        assert batch_report.images[b].kept_indices == single_reports[b].images[0].kept_indices
        torch.testing.assert_close(batch_logits[b][mask[b]], single_logits[b][0], atol=1e-5, rtol=1e-4)
    # and in another batch composition (reversed, with the calibration images)
    with sieve(model), torch.inference_mode():
        model(**calib)
    assert len({im.tokens_out for im in batch_report.images}) > 1 or method == "visionzip"


@pytest.mark.parametrize("method", ["evocut", "divprune", "vispruner"])
def test_keep_all_when_min_is_every_token(tiny, single, method):
    model, _ = tiny
    with torch.inference_mode():
        ref = model(**single).logits
    sieve = Sieve(method, Adaptive(N_TOKENS, N_TOKENS))  # max defaults to the token count: nothing to fit
    with sieve(model), torch.inference_mode():
        got = model(**single).logits
    assert sieve.last_report.images[0].tokens_out == N_TOKENS
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_refusals(tiny, single):
    model, _ = tiny
    before = dict(model.__dict__)
    with pytest.raises(BudgetError, match="calibrate"):  # no threshold yet, refused at apply()
        Sieve("evocut", Adaptive(16)).apply(model)
    with pytest.raises(BudgetError, match="max of 100 tokens exceeds the 64"):
        Sieve("evocut", Adaptive(16, 4, 100, threshold=0.1)).apply(model)
    assert "generate" not in model.__dict__ and model.__dict__.keys() == before.keys()
    for method in ("evoprune", "flowcut"):
        with pytest.raises(StageError, match="inside the vision encoder"):
            Sieve(method, Adaptive(16))
    with pytest.raises(StageError, match="one adaptive budget per sieve"):
        Sieve(["evocut", "fastv"], [Adaptive(32), Adaptive(16)])
    with pytest.raises(BudgetError, match="criterion='coverage'"):
        Sieve("fastv", Adaptive(16, criterion="scores"), layer=1).calibrate(model, [single])  # 2-layer LM
    with pytest.raises(StageError, match="pooled grid"):
        Sieve("pool", Adaptive(16))
    with pytest.raises(BudgetError, match="fits adaptive budgets"):
        Sieve("evocut", 16).calibrate(model, [single])
    with pytest.raises(BudgetError, match="no per-token scores"):
        Sieve("divprune", Adaptive(16, criterion="scores")).calibrate(model, [single])


def test_scores_criterion_and_a_reused_threshold(tiny, calib):
    model, _ = tiny
    sieve = Sieve("fastervlm", Adaptive(16, 4, 40, criterion="scores"))
    cal = sieve.calibrate(model, [calib])
    assert cal.achieved_mean == 16
    again = Sieve("fastervlm", Adaptive(16, 4, 40, threshold=cal.threshold, criterion="scores"))
    with again(model), torch.inference_mode():
        model(**calib)
    assert [im.tokens_out for im in again.last_report.images] == cal.counts
    assert "adaptive:16:4:40" in again.last_report.summary()
    assert tokensieve.Calibration is type(cal)


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_in_llm_adaptive_targets_are_per_image_and_calibrated(images, method):
    """In-LLM budgets are layer-averaged: the criterion reads each image's tokens entering the LM, the method's own
    schedule reaches the target (FastV after layer 2 of 8: from 64 tokens every target in 16..64 is reachable)."""
    model, processor = build_tiny_llava(**dict(TINY, text_layers=8))
    pics = [demo_image(size=96, seed=10 + s) for s in range(8)]
    calib = processor(
        images=pics, text=[prompt(processor, "what is in the picture ?")] * 8, return_tensors="pt", padding=True
    )
    sieve = Sieve(method, Adaptive(28, 20, 48))
    cal = sieve.calibrate(model, [calib])
    assert cal.achieved_mean == 28 and len(set(cal.counts)) > 1
    assert sieve.budget.value.threshold == cal.threshold and sieve.llm_budget is sieve.budget
    with sieve(model), torch.inference_mode():
        model(**calib)
    got = [im.llm_tokens_avg for im in sieve.last_report.images]
    # the schedule keeps an integer count after layer 2, so the average lands within 6/8 of a token of the target
    assert all(abs(g - c) <= 0.75 for g, c in zip(got, cal.counts))
    texts = [prompt(processor, "what is in the picture ?"), prompt(processor, "how many cats are on the couch ?")]
    batch = processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
    with sieve(model), torch.inference_mode():
        model(**batch)
        together = [im.llm_layer_tokens for im in sieve.last_report.images]
        alone = []
        for i in range(2):
            model(**processor(images=[images[i]], text=[texts[i]], return_tensors="pt"))
            alone.append(sieve.last_report.images[0].llm_layer_tokens)
    assert together == alone
