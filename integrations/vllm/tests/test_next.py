"""The plugin's LLaVA-NeXT architecture in an offline ``LLM`` on a tiny random-weight model, against stock vLLM
(keep-all) and against ``Sieve(..., newlines="all" | "none")`` in transformers (kept patches, the prompt the LM
receives, greedy tokens), on a wide, a tall and a square image (5, 3 and 5 crops, unpadded grids).
"""

import helpers
import pytest
from helpers import IMAGE_TOKEN
from reference_common import NEXT_CASES as CASES
from reference_common import case_id

ARCH = "TokenSieveLlavaNextForConditionalGeneration"


@pytest.fixture(scope="module")
def engine(tmp_path_factory, next_reference, next_dir):
    trace = tmp_path_factory.mktemp("next_trace") / "trace.jsonl"
    llm, params = helpers.offline_engine(next_dir / "model", ARCH, trace, next_reference["max_new_tokens"])
    yield from helpers.held([llm, params, trace])


def test_stock_vllm_equals_transformers_on_the_tiny_model(next_stock, next_reference):
    for got, want in zip(next_stock, next_reference["vanilla"]):
        assert got["ids"] == want["ids"] and got["tokens"] == want["tokens"]


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "none"},
        {"method": "evocut", "budget": 1.0},
        {"method": "divprune", "budget": 1.0, "scope": "crop"},
        {"method": "fastervlm", "budget": 1.0, "newlines": "all"},
    ],
    ids=lambda s: f"{s['method']}-{s.get('budget', 'all')}",
)
def test_keep_all_equals_stock_vllm(engine, next_stock, next_reference, next_dir, settings):
    for _, trace in helpers.each_case(engine, next_dir, next_reference["cases"], next_stock, **settings):
        assert len(trace) == 1 and len(trace[0]["kept"]) == len(set(trace[0]["kept"]))


@pytest.mark.parametrize("method, budget, scope, newlines", CASES, ids=[case_id(*c) for c in CASES])
def test_matches_sieve_in_transformers(engine, next_reference, next_dir, method, budget, scope, newlines):
    """Kept patches, the prompt the LM receives and the greedy answer equal Sieve(..., newlines=...)."""
    wants = next_reference["sieve"][case_id(method, budget, scope, newlines)]
    settings = dict(method=method, budget=budget, scope=scope, newlines=newlines)
    helpers.each_case(engine, next_dir, next_reference["cases"], wants, kept=True, **settings)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"method": "evoprune", "budget": 20}, "in-encoder.*only known after the encoder"),
        ({"method": "divprune", "budget": 20, "newlines": "rows"}, "newlines 'rows' is not supported"),
        ({"method": "divprune", "budget": 81}, "exceeds the 80 visual tokens"),
        ({"method": "divprune", "budget": 17, "scope": "crop"}, "exceeds the 16 visual tokens"),
        ({"method": "fastv", "budget": 20}, "in-LLM"),
    ],
)
def test_bad_settings_fail_the_request_not_the_engine(engine, next_reference, next_dir, settings, match):
    good = dict(method="random", budget=2, scope="crop", params={"seed": 3}, newlines="none")
    ids = helpers.refused_then_served(engine, next_dir, next_reference["cases"][1], settings, match, **good)
    assert ids.count(IMAGE_TOKEN) == 6  # 3 crops x 2, no newline


def test_one_batch_with_different_settings(engine, next_reference, next_dir):
    wanted = [CASES[0], CASES[5], CASES[3]]
    keys = ("method", "budget", "scope", "newlines")
    settings = [dict(zip(keys, c)) for c in wanted]
    wants = [next_reference["sieve"][case_id(*c)][i] for i, c in enumerate(wanted)]
    helpers.one_batch(engine, next_dir, next_reference["cases"], settings, wants)
