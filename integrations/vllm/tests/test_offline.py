"""The plugin in an offline ``LLM`` on the embedded default model, against stock vLLM and against ``Sieve``.

One engine for the whole module (server default: evocut, 36 tokens per image, set through ``hf_overrides``);
every request names its own setting through ``mm_processor_kwargs``. The engine appends one line per encoded image
to a trace file (``TOKENSIEVE_VLLM_TRACE``): that is where the kept patch indices are read from.
"""

import helpers
import pytest
from helpers import ARCH, DEFAULT_MODEL, IMAGE_TOKEN, TOKENS

SERVER_DEFAULT = {"method": "evocut", "budget": 36}


@pytest.fixture(scope="module")
def engine(tmp_path_factory, reference):
    trace = tmp_path_factory.mktemp("trace") / "trace.jsonl"
    llm, params = helpers.offline_engine(
        DEFAULT_MODEL, ARCH, trace, reference["max_new_tokens"], tokensieve=SERVER_DEFAULT
    )
    yield from helpers.held([llm, params, trace])


def ask(engine, ref_dir, case, **settings):
    return helpers.ask(*engine, ref_dir, case, **settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "none"},
        {"method": "evocut", "budget": TOKENS},
        {"method": "divprune", "budget": 1.0},
        {"method": "fastervlm", "budget": TOKENS},
        {"method": "evoprune", "budget": TOKENS},
    ],
    ids=lambda s: f"{s['method']}-{s.get('budget', 'all')}",
)
def test_keep_all_equals_stock_vllm(engine, stock, reference, ref_dir, settings):
    for ids, trace in helpers.each_case(engine, ref_dir, reference["cases"], stock, **settings):
        assert ids.count(IMAGE_TOKEN) == TOKENS
        assert [t["kept"] for t in trace] == [list(range(TOKENS))]


def _cases(reference_json):
    return [(m, k) for m, budgets in reference_json.items() for k in budgets]


@pytest.mark.parametrize(
    "method, k",
    [
        ("evocut", "16"),
        ("evocut", "72"),
        ("divprune", "16"),
        ("divprune", "72"),
        ("fastervlm", "16"),
        ("fastervlm", "72"),
        ("visionzip", "36"),
        ("pool", "36"),
        ("random", "36"),
        ("hiprune", "36"),
        ("vtc_cls", "36"),
        ("evoprune", "36"),
        ("flowcut", "36"),
    ],
)
def test_matches_sieve_in_transformers(engine, reference, ref_dir, method, k):
    """Kept patches, the prompt the LM receives (text + k tokens) and the greedy answer equal the Sieve path."""
    cases, wants = reference["cases"], reference["sieve"][method][k]
    for ids, _ in helpers.each_case(engine, ref_dir, cases, wants, kept=True, method=method, budget=int(k)):
        assert ids.count(IMAGE_TOKEN) == int(k)


def test_server_default_and_per_request_override(engine, reference, ref_dir):
    case = reference["cases"][0]
    ids, _, trace = ask(engine, ref_dir, case)
    text = len(ids) - ids.count(IMAGE_TOKEN)
    assert ids.count(IMAGE_TOKEN) == 36 and trace[0]["method"] == "evocut"
    ids, _, trace = ask(engine, ref_dir, case, budget=20)  # same image, new budget: a new processor-cache entry
    assert ids.count(IMAGE_TOKEN) == 20 and len(ids) == text + 20 and trace[0]["method"] == "evocut"
    ids, _, trace = ask(engine, ref_dir, case, method="divprune")  # server budget, divprune's own defaults
    assert ids.count(IMAGE_TOKEN) == 36 and trace[0]["method"] == "divprune" and trace[0]["params"] == {}
    ids, _, trace = ask(engine, ref_dir, case, method="pool", budget=0.5)
    assert ids.count(IMAGE_TOKEN) == 72 and len(trace[0]["kept"]) == 72


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"method": "fastv", "budget": 16}, "in-LLM"),
        ({"method": "nope", "budget": 16}, "unknown method"),
        ({"budget": 0}, "at least one token"),
        ({"budget": 145}, "exceeds"),
        ({"budget": "16"}, "must be an int"),
        ({"budget": 16.5}, "keep ratio"),
        ({"scope": "global"}, "scope"),
    ],
)
def test_bad_settings_fail_the_request_not_the_engine(engine, reference, ref_dir, settings, match):
    good = dict(method="random", budget=12, params={"seed": 1})
    ids = helpers.refused_then_served(engine, ref_dir, reference["cases"][1], settings, match, **good)
    assert ids.count(IMAGE_TOKEN) == 12


def test_one_batch_with_different_settings(engine, reference, ref_dir):
    """Requests with different methods and budgets in one generate() call: images are grouped by setting inside
    the engine and each request still gets exactly its own tokens and answer."""
    wanted = [("evocut", "16"), ("divprune", "72"), ("fastervlm", "16")]
    # scope "crop" is "image" on LLaVA-1.5: same selection, but new cache keys, so every image is encoded again
    settings = [{"method": method, "budget": int(k), "scope": "crop"} for method, k in wanted]
    wants = [reference["sieve"][method][k][i] for i, (method, k) in enumerate(wanted)]
    lines = helpers.one_batch(engine, ref_dir, reference["cases"], settings, wants)
    for (method, _), want in zip(wanted, wants):
        assert [t["kept"] for t in lines if t["method"] == method] == [want["kept"]]
