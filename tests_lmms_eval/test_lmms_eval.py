"""tokensieve inside lmms-eval 0.7.3, end to end on the embedded default model (run by .ci/lmms_eval.sh).

Not collected by the core suite (pytest's testpaths is tests/): it needs lmms-eval, installed with --no-deps.
Every run goes through the installed `tokensieve lmms-eval` command in a subprocess, so `--model tokensieve` is
resolved through the package's entry point exactly as a user's run resolves it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from tokensieve import Sieve
from tokensieve.data import easyvqa, shapes
from tokensieve.data.shapes import Sample
from tokensieve.tools.evaluate import load_model, predict

QUESTIONS = 100  # lmms-eval's --limit takes the first N documents


def run_lmms_eval(out: Path, model_args: str, *extra: str, limit: int = QUESTIONS, batch: int = 8):
    """(exit code, output, results dict or None, samples by doc id) of one launcher run."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        str(Path(sys.executable).parent / "tokensieve"),
        "lmms-eval",
        *extra,
        "--model_args",
        model_args,
        "--tasks",
        "tokensieve_easyvqa",
        "--batch_size",
        str(batch),
        "--limit",
        str(limit),
        "--output_path",
        str(out),
        "--log_samples",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob("*_samples_tokensieve_easyvqa.jsonl"))
    by_doc = {}
    if samples:
        for line in samples[-1].read_text().splitlines():
            s = json.loads(line)
            by_doc[s["doc_id"]] = s
    return (
        proc.returncode,
        proc.stdout + proc.stderr,
        json.loads(results[-1].read_text()) if results else None,
        by_doc,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(name: str, model_args: str, *extra: str, batch: int = 8):
        if name not in cache:
            code, output, results, samples = run_lmms_eval(
                tmp_path_factory.mktemp(name), model_args, *extra, batch=batch
            )
            assert code == 0, output[-4000:]
            cache[name] = results, samples
        return cache[name]

    return get


@lru_cache(maxsize=1)
def reference_model():
    return load_model(None)


def tokensieve_eval_answers(sieve=None) -> list[str]:
    """What `tokensieve eval` answers on the first QUESTIONS easy-VQA test questions (its own predict, batch 32)."""
    samples = [
        Sample(easyvqa.load_image("test", image_id), q, a, easyvqa.family(a), i)
        for i, (q, a, image_id) in enumerate(easyvqa.questions("test")[:QUESTIONS])
    ]
    model, processor = reference_model()
    return predict(model, processor, samples, sieve=sieve, batch_size=32).answers


def answers(samples: dict) -> list[str]:
    assert sorted(samples) == list(range(QUESTIONS))
    return [
        samples[i]["filtered_resps"][0].strip().lower()
        if isinstance(samples[i]["filtered_resps"], list)
        else samples[i]["filtered_resps"].strip().lower()
        for i in range(QUESTIONS)
    ]


def accuracy(results: dict) -> float:
    return results["results"]["tokensieve_easyvqa"]["exact_match,none"]


# -- the model is found and the tasks are tokensieve's data ---------------------------------------------------


def test_entry_point_resolves_the_wrapper():
    from lmms_eval.models import get_model, get_model_manifest

    from tokensieve.lmms_eval.model import TokensieveChat

    assert get_model("tokensieve") is TokensieveChat
    assert get_model_manifest("tokensieve").chat_class_path == "tokensieve.lmms_eval.model.TokensieveChat"


def test_task_documents_are_the_test_splits_of_tokensieve_data():
    import importlib.util

    import datasets

    from tokensieve.lmms_eval import TASKS_DIR

    spec = importlib.util.spec_from_file_location("tasks_utils", TASKS_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    docs = utils.process_docs(datasets.Dataset.from_json(str(TASKS_DIR / "easyvqa.jsonl")))
    assert [(d["question"], d["answer"], d["image_id"]) for d in docs] == list(easyvqa.questions("test"))
    for d in docs.select(range(0, len(docs), 997)):
        assert utils.easyvqa_doc_to_visual(d)[0].tobytes() == easyvqa.load_image("test", d["image_id"]).tobytes()
        assert d["family"] == easyvqa.family(d["answer"])
    docs = utils.process_docs(datasets.Dataset.from_json(str(TASKS_DIR / "shapes.jsonl")))
    assert len(docs) == shapes.TEST_SIZE
    for s in shapes.dataset("test", 30):
        d = docs[s.index]
        assert (d["index"], d["question"], d["answer"], d["family"]) == (s.index, s.question, s.answer, s.family)
        assert utils.shapes_doc_to_visual(d)[0].tobytes() == s.image.tobytes()
    assert utils.process_results(docs[0], [f"  {docs[0]['answer'].upper()} "]) == {"exact_match": 1.0}
    assert utils.process_results(docs[0], ["not it"]) == {"exact_match": 0.0}


def test_model_arguments_are_validated_before_loading():
    from tokensieve.lmms_eval import TASKS_DIR
    from tokensieve.lmms_eval.model import build_sieve, resolve_pretrained

    assert resolve_pretrained("default").name == "default_model"
    assert resolve_pretrained("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"  # left to transformers
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_pretrained(str(TASKS_DIR))
    sieve = build_sieve("evocut+fastv", "192+128", "image", {"fastv": {"layer": 1}})
    assert sieve.name == "evocut+fastv" and sieve.llm_method.layer == 1 and sieve.llm_budget.value == 128
    assert build_sieve("none", None, "image", {}) is None
    with pytest.raises(ValueError, match="METHOD.NAME"):
        build_sieve("evocut", 64, "image", {"divprune": {"x": 1}})
    with pytest.raises(ValueError, match="drop budget"):
        build_sieve("none", 64, "image", {})
    with pytest.raises(TypeError, match="bad parameter for method 'evocut'"):
        build_sieve("evocut", 64, "image", {"evocut": {"nonsense": 3}})


# -- answers equal tokensieve eval's; batch and process count change nothing ---------------------------------


@pytest.mark.parametrize("method", ["none", "evocut"])
def test_answers_equal_tokensieve_eval(runs, method):
    model_args = "pretrained=default,method=none" if method == "none" else "pretrained=default,method=evocut,budget=72"
    results, samples = runs(method, model_args)
    expected = tokensieve_eval_answers(None if method == "none" else Sieve("evocut", 72))
    got = answers(samples)
    assert got == expected
    targets = [samples[i]["target"] for i in range(QUESTIONS)]
    assert accuracy(results) == pytest.approx(sum(a == t for a, t in zip(expected, targets)) / QUESTIONS)
    # the cost travels with the accuracy: per question in the samples, per run in the throughput section
    kept = 144 if method == "none" else 72
    counts = [samples[i]["token_counts"][0] for i in range(QUESTIONS)]
    assert all(c["visual_tokens_in"] == 144 and c["visual_tokens"] == kept and c["images"] == 1 for c in counts)
    throughput = results["throughput"]
    assert throughput["avg_visual_tokens_per_image"] == kept
    assert throughput["avg_visual_tokens_in_per_image"] == 144
    ratio = throughput["avg_flops_to_first_token_ratio"]
    assert ratio == 1.0 if method == "none" else 0.5 < ratio < 0.8
    assert throughput["avg_flops_to_first_token_per_question"] == pytest.approx(
        sum(c["flops_to_first_token"] for c in counts) / QUESTIONS
    )


def test_pruned_prompts_are_shorter_by_the_dropped_tokens(runs):
    _, full = runs("none", "pretrained=default,method=none")
    _, cut = runs("evocut", "pretrained=default,method=evocut,budget=72")
    for i in range(QUESTIONS):
        a, b = full[i]["token_counts"][0], cut[i]["token_counts"][0]
        assert b["input_tokens"] == a["input_tokens"] - 72
        assert b["flops_to_first_token_unpruned"] == a["flops_to_first_token"] > b["flops_to_first_token"]


def test_batch_size_one_gives_the_answers_of_batch_size_eight(runs):
    _, eight = runs("evocut", "pretrained=default,method=evocut,budget=72")
    _, one = runs("evocut-b1", "pretrained=default,method=evocut,budget=72", batch=1)
    assert answers(one) == answers(eight)
    assert [one[i]["token_counts"] for i in range(QUESTIONS)] == [eight[i]["token_counts"] for i in range(QUESTIONS)]


def test_two_processes_give_the_accuracy_of_one(runs):
    one_results, one = runs("evocut", "pretrained=default,method=evocut,budget=72")
    two_results, two = runs("evocut-2p", "pretrained=default,method=evocut,budget=72", "--num_processes", "2")
    assert accuracy(two_results) == accuracy(one_results)
    assert answers(two) == answers(one)
    # every question counted once, gathered over both processes
    assert two_results["throughput"]["avg_flops_to_first_token_per_question"] == pytest.approx(
        one_results["throughput"]["avg_flops_to_first_token_per_question"]
    )
    assert two_results["config"]["model_args"] == "pretrained=default,method=evocut,budget=72"


# -- a broken run fails ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_args,message",
    [
        ("method=nosuch,budget=72", "unknown method 'nosuch'"),
        ("method=evocut,budget=0", "budget must keep at least one token"),
        ("method=evocut,budget=500", "budget of 500 tokens exceeds the 144 visual tokens"),  # fails inside generation
    ],
)
def test_bad_method_or_budget_fails_the_run(tmp_path, model_args, message):
    code, output, results, _ = run_lmms_eval(tmp_path, "pretrained=default," + model_args, limit=4)
    assert code != 0
    assert message in output
    assert results is None


# -- other families through the auto classes, in-process ------------------------------------------------------


def _wrapper_answers(lm, docs: list[dict], task: str = "t") -> list:
    """generate_until on hand-made chat requests, as lmms-eval's evaluator builds them."""
    from lmms_eval.api.instance import Instance

    def to_messages(doc):
        content = [{"type": "image", "url": im} for im in doc["images"]] + [{"type": "text", "text": doc["q"]}]
        return [{"role": "user", "content": content}]

    lm.task_dict = {task: {"test": docs}}
    requests = [
        Instance(
            request_type="generate_until",
            idx=0,
            metadata={"task": task, "doc_id": i, "repeats": 1},
            arguments=("", to_messages, {"max_new_tokens": 4, "until": []}, i, task, "test"),
        )
        for i in range(len(docs))
    ]
    return lm.generate_until(requests)


@pytest.mark.parametrize("family", ["llava_next", "idefics3"])
def test_other_families_load_through_the_auto_classes_and_batch_like_single_calls(tmp_path, family):
    """A padded batch with a two-image question gives each question the answer and the kept-token count of the
    question on its own, equal to applying the Sieve to the model directly; FLOPs are left out for families the
    FLOPs module does not price."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from PIL import Image

    from tests.families.builders import build_tiny_idefics3, build_tiny_llava_next
    from tokensieve.lmms_eval.model import TokensieveChat

    model, processor = build_tiny_llava_next() if family == "llava_next" else build_tiny_idefics3()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    rng = torch.Generator().manual_seed(0)

    def image(w, h):
        return Image.fromarray((torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy())

    docs = [
        {"images": [image(40, 24)], "q": "what is in the picture ?"},
        {"images": [image(24, 24), image(32, 48)], "q": "what ?"},
        {"images": [image(30, 30)], "q": "is there a red shape in the top left ?"},
    ]
    args = f"pretrained={tmp_path},method=divprune,budget=0.5"
    batched = _wrapper_answers(TokensieveChat.create_from_arg_string(args, {"batch_size": 3}), docs)
    single = _wrapper_answers(TokensieveChat.create_from_arg_string(args, {"batch_size": 1}), docs)
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.token_counts.to_dict() for r in batched] == [r.token_counts.to_dict() for r in single]
    sieve = Sieve("divprune", 0.5)
    for doc, got in zip(docs, batched):
        content = [{"type": "image"}] * len(doc["images"]) + [{"type": "text", "text": doc["q"]}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        inputs = processor(images=[doc["images"]], text=[text], return_tensors="pt")
        with torch.inference_mode(), sieve(model):
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert got.text == processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        counts = got.token_counts
        assert counts.images == len(doc["images"])
        assert (
            counts.visual_tokens
            == sieve.last_report.tokens_out
            < counts.visual_tokens_in
            == sieve.last_report.tokens_in
        )
        assert counts.flops_to_first_token is None
