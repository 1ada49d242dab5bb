"""The plugin in an offline ``LLM`` on the embedded default model, against stock vLLM and against ``Sieve``.

One engine for the whole module (server default: evocut, 36 tokens per image, set through ``hf_overrides``);
every request names its own setting through ``mm_processor_kwargs``. The engine appends one line per encoded image
to a trace file (``TOKENSIEVE_VLLM_TRACE``): that is where the kept patch indices are read from.
"""

import json

import helpers
import pytest
from helpers import ARCH, DEFAULT_MODEL, IMAGE_TOKEN, TOKENS
from PIL import Image

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
    for case, want in zip(reference["cases"], stock):
        ids, tokens, trace = ask(engine, ref_dir, case, **settings)
        assert ids == want["ids"] and ids.count(IMAGE_TOKEN) == TOKENS
        assert tokens == want["tokens"]
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
    for case, want in zip(reference["cases"], reference["sieve"][method][k]):
        ids, tokens, trace = ask(engine, ref_dir, case, method=method, budget=int(k))
        assert ids == want["ids"]
        assert ids.count(IMAGE_TOKEN) == int(k) and len(ids) == len(want["ids"])
        assert [t["kept"] for t in trace] == [want["kept"]]
        assert tokens == want["tokens"]


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
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=match):
        ask(engine, ref_dir, reference["cases"][1], **settings)
    ids, tokens, _ = ask(engine, ref_dir, reference["cases"][1], method="random", budget=12, params={"seed": 1})
    assert ids.count(IMAGE_TOKEN) == 12 and tokens


def test_one_batch_with_different_settings(engine, reference, ref_dir):
    """Requests with different methods and budgets in one generate() call: images are grouped by setting inside
    the engine and each request still gets exactly its own tokens and answer."""
    llm, params, trace = engine
    wanted = [("evocut", "16"), ("divprune", "72"), ("fastervlm", "16")]
    prompts = []
    for case, (method, k) in zip(reference["cases"], wanted):
        image = Image.open(ref_dir / case["image"]).convert("RGB")
        # scope "crop" is "image" on LLaVA-1.5: same selection, but new cache keys, so every image is encoded again
        prompts.append(
            {
                "prompt": case["prompt"],
                "multi_modal_data": {"image": image},
                "mm_processor_kwargs": {
                    "tokensieve_method": method,
                    "tokensieve_budget": int(k),
                    "tokensieve_scope": "crop",
                },
            }
        )
    before = len(trace.read_text().splitlines())
    outs = llm.generate(prompts, params, use_tqdm=False)
    lines = [json.loads(x) for x in trace.read_text().splitlines()[before:]]
    for i, (out, (method, k)) in enumerate(zip(outs, wanted)):
        want = reference["sieve"][method][k][i]
        assert list(out.prompt_token_ids) == want["ids"]
        assert list(out.outputs[0].token_ids) == want["tokens"]
        assert [t["kept"] for t in lines if t["method"] == method] == [want["kept"]]
