"""The command line, run in-process and as a subprocess where the entry point itself matters."""

import json
import subprocess
import sys

import pytest

from tokensieve.cli import main
from tokensieve.methods import method_names


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in method_names():
        assert name in out


def test_run_on_the_tiny_demo_reports_counts(capsys):
    assert main(["run", "--tiny", "--method", "evocut", "--budget", "64", "--json", "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "tiny-random-llava"
    assert result["visual_tokens_in"] == 144 and result["visual_tokens_out"] == 64
    assert result["seq_len_in"] - result["seq_len_out"] == 80
    assert isinstance(result["answer"], str)


def test_run_says_plainly_that_the_demo_model_is_random(capsys):
    assert main(["run", "--tiny", "--method", "pool", "--budget", "0.25", "--max-new-tokens", "2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "RANDOM-WEIGHT" in out and "meaningless" in out
    assert "144 -> 36" in out


def test_saved_model_directory_loads_offline(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    assert main(["make-tiny", str(model_dir)]) == 0
    capsys.readouterr()
    code = main(["run", "--model", str(model_dir), "--method", "fastervlm", "--budget", "16",
                 "--param", "layer=3", "--json", "--max-new-tokens", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == str(model_dir) and result["visual_tokens_out"] == 16


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "--budget", "0"], "at least one token"),
        (["run", "--budget", "2.5"], "(0, 1]"),
        (["run", "--tiny", "--budget", "1000", "--max-new-tokens", "1"], "exceeds the 144 visual tokens"),
        (["run", "--tiny", "--model", "x"], "either --model or --tiny"),
        (["eval", "--methods", "nope", "--out", "x"], "unknown method 'nope'"),
        (["eval", "--budgets", "0.5,3.0", "--out", "x"], "(0, 1]"),
        (["eval", "--model", "/nonexistent", "--out", "x"], "no model at /nonexistent"),
        (["run", "--method", "nope"], "unknown method 'nope'"),
        (["run", "--param", "alpha=3.0"], "alpha"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in " ".join(capsys.readouterr().out.split())


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "tokensieve.cli", "methods"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "evocut" in proc.stdout


def test_run_defaults_to_the_embedded_model_on_a_benchmark_scene(capsys):
    assert main(["run", "--method", "pool", "--budget", "0.25", "--json", "--compare"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "default" and result["visual_tokens_out"] == 36
    assert result["prompt"].endswith("?") and result["vanilla"]["answer"] == result["expected"]
def test_run_chains_a_pre_llm_and_an_in_llm_method(capsys):
    assert main(["run", "--tiny", "--method", "evocut+fastv", "--budget", "64+40", "--json", "--max-new-tokens", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "evocut+fastv" and result["visual_tokens_out"] == 64
    assert abs(result["llm_visual_tokens_avg"] - 40) < 1  # 4-layer demo LM: 64, 64, then 16 from layer 2 on
