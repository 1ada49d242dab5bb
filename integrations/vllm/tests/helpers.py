"""Shared by the vLLM tests: paths, the stock-named copy of the default model, engine settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DEFAULT_MODEL = REPO / "src" / "tokensieve" / "models" / "default_model"
ARCH = "TokenSieveLlavaForConditionalGeneration"
IMAGE_TOKEN = 4
TOKENS = 144
ENGINE = dict(max_model_len=512, max_num_seqs=4, enforce_eager=True, dtype="float32", seed=0)
"""Small engines: a 512-token context and a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE) are plenty for 144-token images."""


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def stock_copy(dst: Path, src: Path = DEFAULT_MODEL) -> Path:
    """A model (the default one) with its CLIP weights renamed the way stock vLLM's loader expects (`vision_model.`
    level).

    Only the stock reference needs this: the plugin maps the names at load time.
    """
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")

    def name(k: str) -> str:
        for head in ("vision_tower.", "model.vision_tower."):
            if k.startswith(head) and not k.startswith(head + "vision_model."):
                return head + "vision_model." + k[len(head) :]
        return k

    renamed = {name(k): v for k, v in weights.items()}
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def sieve_reference(out: Path, script: str = "reference_sieve.py") -> dict:
    """Run a reference script (``reference_sieve.py``: LLaVA-1.5 on the default model; ``reference_qwen.py``: a tiny
    Qwen2.5-VL it builds) with the core environment's Python (``TOKENSIEVE_CORE_PYTHON``)."""
    python = os.environ.get("TOKENSIEVE_CORE_PYTHON")
    if not python:
        raise RuntimeError(
            "set TOKENSIEVE_CORE_PYTHON to the Python of an environment with core tokensieve and its pinned "
            "transformers (the Sieve reference cannot run next to vLLM's transformers)"
        )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    subprocess.run([python, str(Path(__file__).parent / script), str(out)], check=True, env=env, timeout=900)
    return json.loads((out / "reference.json").read_text())


def stock_outputs(model_dir: Path, ref_dir: Path, family: str = "llava") -> dict:
    """Greedy outputs of stock vLLM (stock architecture, no plugin model involved) in a fresh process."""
    out = ref_dir / "stock.json"
    subprocess.run(
        [sys.executable, str(Path(__file__).parent / "stock_outputs.py"), str(model_dir), str(ref_dir), family],
        check=True,
        env=dict(engine_env(), VLLM_ENABLE_V1_MULTIPROCESSING="0"),
        timeout=1200,
    )
    return json.loads(out.read_text())


def ask(llm, sampling, trace: Path, image_dir: Path, case: dict, **settings) -> tuple[list[int], list[int], list[dict]]:
    """One offline request (a reference case's prompt and image, ``tokensieve_*`` settings); returns (prompt ids,
    answer ids, the trace lines the engine added for it)."""
    from PIL import Image

    before = trace.read_text().splitlines() if trace.exists() else []
    image = Image.open(image_dir / case["image"]).convert("RGB")
    prompt = {"prompt": case["prompt"], "multi_modal_data": {"image": image}}
    if settings:
        prompt["mm_processor_kwargs"] = {f"tokensieve_{k}": v for k, v in settings.items()}
    out = llm.generate(prompt, sampling, use_tqdm=False)[0]
    after = trace.read_text().splitlines() if trace.exists() else []
    return list(out.prompt_token_ids), list(out.outputs[0].token_ids), [json.loads(x) for x in after[len(before) :]]


def offline_engine(model_dir: Path, arch: str, trace: Path, max_new_tokens: int, **hf_overrides):
    """An offline ``LLM`` of a plugin architecture that traces every encoded image to ``trace``; returns (llm, greedy
    sampling params)."""
    from vllm import LLM, SamplingParams

    os.environ["TOKENSIEVE_VLLM_TRACE"] = str(trace)  # read when the engine builds the model
    try:
        llm = LLM(model=str(model_dir), hf_overrides={"architectures": [arch], **hf_overrides}, **ENGINE)
    finally:
        del os.environ["TOKENSIEVE_VLLM_TRACE"]
    return llm, SamplingParams(max_tokens=max_new_tokens, temperature=0.0)


def held(engine: list):
    """Body of a module-scoped engine fixture: yields ``engine`` (the LLM first), then drops every reference to the
    LLM and collects it before the next module starts its own. pytest keeps a fixture's value cached past teardown;
    an LLM collected later, at some random point, would tear down the process-wide parallel state the next
    module's engine runs on."""
    import gc

    yield engine
    engine.clear()
    gc.collect()


# -- the promises test_offline.py (LLaVA-1.5), test_next.py and test_qwen.py share --------------------------------


def each_case(
    engine: list, image_dir: Path, cases: list[dict], wants: list[dict], *, kept: bool = False, **settings
) -> list[tuple[list[int], list[dict]]]:
    """Ask every reference case with ``settings`` on an offline ``engine`` (``[llm, sampling, trace, ...]``) and hold
    the request to its ``want`` (stock vLLM's or the ``Sieve`` path's outputs on that case): the prompt the LM
    receives and the greedy tokens, and with ``kept`` the one encoded image's kept patches. Returns each case's
    (prompt ids, trace lines) for what a family checks beyond that."""
    out = []
    for case, want in zip(cases, wants):
        ids, tokens, trace = ask(*engine[:3], image_dir, case, **settings)
        assert ids == want["ids"]
        if kept:
            assert [t["kept"] for t in trace] == [want["kept"]]
        assert tokens == want["tokens"]
        out.append((ids, trace))
    return out


def refused_then_served(engine: list, image_dir: Path, case: dict, bad: dict, match: str, **good) -> list[int]:
    """A request with ``bad`` settings fails with ``match`` (the request, not the engine); the next request, with
    ``good`` settings, is answered. Returns its prompt ids."""
    import pytest
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=match):
        ask(*engine[:3], image_dir, case, **bad)
    ids, tokens, _ = ask(*engine[:3], image_dir, case, **good)
    assert tokens
    return ids


def one_batch(engine: list, image_dir: Path, cases: list[dict], settings: list[dict], wants: list[dict]) -> list[dict]:
    """Requests with different settings in one ``generate()`` call, one per case: each gets exactly its own prompt and
    answer (``wants``: the ``Sieve`` path's outputs). Returns the trace lines the call added."""
    from PIL import Image

    llm, params, trace = engine[:3]
    prompts = []
    for case, setting in zip(cases, settings):
        image = Image.open(image_dir / case["image"]).convert("RGB")
        prompts.append(
            {
                "prompt": case["prompt"],
                "multi_modal_data": {"image": image},
                "mm_processor_kwargs": {f"tokensieve_{k}": v for k, v in setting.items()},
            }
        )
    before = trace.read_text().splitlines() if trace.exists() else []
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, want in zip(outs, wants):
        assert list(out.prompt_token_ids) == want["ids"]
        assert list(out.outputs[0].token_ids) == want["tokens"]
    return [json.loads(x) for x in trace.read_text().splitlines()[len(before) :]]
