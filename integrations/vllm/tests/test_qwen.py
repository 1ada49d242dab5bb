"""The plugin's Qwen2.5-VL architecture in an offline ``LLM`` on a tiny random-weight model, against stock vLLM
(keep-all) and against ``Sieve`` in transformers (kept merge units, the prompt the LM receives, greedy tokens).

Kept tokens keep their full-grid M-RoPE ids on both paths; the greedy answers only agree when vLLM places them
the same way (the cases include a wide and a tall image, whose grids differ in height and width).
"""

import helpers
import pytest

ARCH = "TokenSieveQwen2_5_VLForConditionalGeneration"
IMAGE_PAD = "<|image_pad|>"


@pytest.fixture(scope="module")
def engine(tmp_path_factory, qwen_reference, qwen_dir):
    trace = tmp_path_factory.mktemp("qwen_trace") / "trace.jsonl"
    llm, params = helpers.offline_engine(qwen_dir / "model", ARCH, trace, qwen_reference["max_new_tokens"])
    pad = llm.get_tokenizer().convert_tokens_to_ids(IMAGE_PAD)
    yield from helpers.held([llm, params, trace, pad])


def ask(engine, qwen_dir, case, **settings):
    return helpers.ask(*engine[:3], qwen_dir, case, **settings)


def test_stock_vllm_equals_transformers_on_the_tiny_model(qwen_stock, qwen_reference):
    """The yardstick itself: stock vLLM and transformers agree on the uncompressed prompts and answers."""
    for got, want in zip(qwen_stock, qwen_reference["vanilla"]):
        assert got["ids"] == want["ids"] and got["tokens"] == want["tokens"]


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "none"},
        {"method": "evocut", "budget": 1.0},
        {"method": "divprune", "budget": 1.0},
        {"method": "fastervlm", "budget": 1.0},
    ],
    ids=lambda s: f"{s['method']}-{s.get('budget', 'all')}",
)
def test_keep_all_equals_stock_vllm(engine, qwen_stock, qwen_reference, qwen_dir, settings):
    pad = engine[3]
    for ids, trace in helpers.each_case(engine, qwen_dir, qwen_reference["cases"], qwen_stock, **settings):
        assert [t["kept"] for t in trace] == [list(range(ids.count(pad)))]


@pytest.mark.parametrize(
    "method, k",
    [
        ("evocut", "4"),
        ("evocut", "12"),
        ("divprune", "4"),
        ("divprune", "12"),
        ("fastervlm", "4"),
        ("fastervlm", "12"),
        ("visionzip", "9"),
        ("pool", "9"),
        ("random", "9"),
        ("hiprune", "9"),
        ("vtc_cls", "9"),
    ],
)
def test_matches_sieve_in_transformers(engine, qwen_reference, qwen_dir, method, k):
    """Kept units, the prompt the LM receives (text + k tokens) and the greedy answer equal the Sieve path."""
    pad, cases, wants = engine[3], qwen_reference["cases"], qwen_reference["sieve"][method][k]
    for ids, _ in helpers.each_case(engine, qwen_dir, cases, wants, kept=True, method=method, budget=int(k)):
        assert ids.count(pad) == int(k)


def test_ratio_budget_resolves_per_image(engine, qwen_reference, qwen_dir):
    """An image's token count depends on its size: a ratio keeps that share of each image's own units."""
    pad = engine[3]
    counts = [v["ids"].count(pad) for v in qwen_reference["vanilla"]]
    assert counts == [36, 18, 18]
    for case, n in zip(qwen_reference["cases"], counts):
        ids, _, trace = ask(engine, qwen_dir, case, method="divprune", budget=0.5)
        assert ids.count(pad) == n // 2 and len(trace[0]["kept"]) == n // 2


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"method": "evoprune", "budget": 9}, "in-encoder"),
        ({"method": "fastv", "budget": 9}, "in-LLM"),
        ({"method": "divprune", "budget": 19}, "exceeds the 18 visual tokens of this image"),
        ({"method": "divprune", "budget": 9, "scope": "frame"}, "scope"),
    ],
)
def test_bad_settings_fail_the_request_not_the_engine(engine, qwen_reference, qwen_dir, settings, match):
    case = qwen_reference["cases"][1]
    ids = helpers.refused_then_served(engine, qwen_dir, case, settings, match, method="random", budget=5)
    assert ids.count(engine[3]) == 5


def test_videos_are_refused_clearly(engine, qwen_reference, qwen_dir):
    import numpy as np
    from vllm.exceptions import VLLMValidationError

    llm, params, _, _ = engine
    video = np.zeros((4, 48, 48, 3), dtype=np.uint8)
    with pytest.raises(VLLMValidationError, match="images only; videos are refused"):
        llm.generate(
            {"prompt": "<|vision_start|><|video_pad|><|vision_end|> what ?", "multi_modal_data": {"video": video}},
            params,
            use_tqdm=False,
        )


def test_one_batch_with_different_settings(engine, qwen_reference, qwen_dir):
    """Images of different sizes and settings in one generate() call keep their own tokens, positions, answers."""
    wanted = [("evocut", "12"), ("divprune", "4"), ("fastervlm", "12")]
    settings = [{"method": method, "budget": int(k)} for method, k in wanted]
    wants = [qwen_reference["sieve"][method][k][i] for i, (method, k) in enumerate(wanted)]
    helpers.one_batch(engine, qwen_dir, qwen_reference["cases"], settings, wants)
