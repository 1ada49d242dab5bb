import os
import sys
from pathlib import Path

# one engine in the test process itself (no engine-core subprocess to spawn), small CPU KV cache, one thread
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import sieve_reference, stock_copy, stock_outputs  # noqa: E402


@pytest.fixture(scope="session")
def ref_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reference")


@pytest.fixture(scope="session")
def reference(ref_dir) -> dict:
    """The Sieve path in transformers (core environment), computed once per run."""
    return sieve_reference(ref_dir)


@pytest.fixture(scope="session")
def stock(reference, ref_dir, tmp_path_factory) -> list[dict]:
    """Stock vLLM on the same cases (stock architecture, renamed-weights copy), computed once per run."""
    return stock_outputs(stock_copy(tmp_path_factory.mktemp("stock_model")), ref_dir)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwen")


@pytest.fixture(scope="session")
def qwen_reference(qwen_dir) -> dict:
    """A tiny Qwen2.5-VL saved to ``qwen_dir/model`` and the Sieve path on it (core environment)."""
    return sieve_reference(qwen_dir, "reference_qwen.py")


@pytest.fixture(scope="session")
def qwen_stock(qwen_reference, qwen_dir) -> list[dict]:
    return stock_outputs(qwen_dir / "model", qwen_dir, "qwen")


@pytest.fixture(scope="session")
def next_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llava_next")


@pytest.fixture(scope="session")
def next_reference(next_dir) -> dict:
    """A tiny LLaVA-NeXT saved to ``next_dir/model`` and the Sieve path on it (core environment)."""
    return sieve_reference(next_dir, "reference_next.py")


@pytest.fixture(scope="session")
def next_stock(next_reference, next_dir) -> list[dict]:
    return stock_outputs(stock_copy(next_dir / "stock_model", next_dir / "model"), next_dir)
