"""``benchmarks/gpu_check.py`` runs in the suite on the tiny model and the CPU, so it never rots before a GPU
runs it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_writes_its_table_on_the_tiny_model(tmp_path):
    args = ["--arch", "tiny", "--device", "cpu", "--batches", "1,2", "--repeats", "1", "--warmup", "0"]
    assert _script().main([*args, "--new-tokens", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"none", "evocut", "divprune", "fastervlm", "vispruner", "evoprune", "fastv", "pdrop"}
    assert {r["batch"] for r in result["rows"]} == {1, 2}
    for row in result["rows"]:
        assert row["ttft_ms"] > 0 and row["syncs_added"] <= 4, row  # the host-sync goal holds here too
    table = (tmp_path / "gpu_check.md").read_text()
    assert "# GPU check: tiny" in table and table.count("\n| ") == 17  # header + 16 rows


def test_gpu_check_refuses_cuda_without_a_gpu(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert _script().main(["--device", "cuda"]) == 2
    assert "no usable CUDA device" in capsys.readouterr().err
