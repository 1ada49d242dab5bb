"""The command line, run in-process (``main(argv)``) and as a subprocess where the entry point itself matters."""

import json
import subprocess
import sys

import pytest
from transformers import LlavaForConditionalGeneration

import tokensieve
from tokensieve import session
from tokensieve.cli import build_parser, main
from tokensieve.methods import get_method, method_names


def cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_methods_lists_every_method_one_row_each_even_in_a_pipe(capsys):
    code, out, _ = cli(["methods"], capsys)
    assert code == 0
    rows = out.splitlines()
    for name in method_names():
        cls = get_method(name)
        # a file or pipe is not squeezed to 80 columns: each method's row holds its whole description
        assert any(f" {name} " in row and cls.description in row for row in rows), name


def test_methods_name_explains_every_parameter_with_its_default(capsys):
    from tokensieve.tools.configs import method_parameters

    for name in method_names():
        cls = get_method(name)
        params = method_parameters(name)  # the constructor's named arguments
        assert set(cls.param_help) == set(params), f"{name}: param_help must describe exactly {sorted(params)}"
        code, out, _ = cli(["methods", name], capsys)
        assert code == 0 and cls.description in out and cls.stage in out
        for pname, default in params.items():
            row = next(line for line in out.splitlines() if line.lstrip("│┃ ").startswith(f"{pname} "))
            assert repr(default) in row and cls.param_help[pname] in row
    code, out, _ = cli(["methods", "fastv"], capsys)
    assert "--param fastv.NAME=VALUE" in out and "layer-averaged" in out
    code, _, err = cli(["methods", "nope"], capsys)
    assert code == 2 and "unknown method 'nope'" in err and "fastv" in err


def test_every_option_has_help_and_its_default_is_shown():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "run" in a.choices).choices
    assert {"methods", "run", "eval", "bench", "show", "make-tiny"} <= set(subparsers)
    for name, sub in subparsers.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.default not in (None, False, [], "==SUPPRESS=="):
                assert f"default: {action.default}" in " ".join(text.split()) or "default" in action.help.lower(), (
                    name,
                    action.dest,
                )


@pytest.mark.slow
def test_version_python_m_and_a_fast_start_without_torch(tmp_path):
    """--help, --version and argument errors import neither torch nor transformers; `methods` needs torch (the
    method classes are torch code) but not transformers. Measured, not timed: sys.modules after the call."""
    code = (
        "import sys; from tokensieve.cli import main\n"
        "assert main(['--help']) == 0 and main(['run', '--budget', 'x']) == 2\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
        "assert main(['methods']) == 0\n"
        "assert 'transformers' not in sys.modules, 'methods imported transformers'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "tokensieve", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"tokensieve {tokensieve.__version__}", proc.stderr


def test_run_on_the_tiny_demo_reports_counts(capsys):
    code, out, _ = cli(
        ["run", "--tiny", "--method", "evocut", "--budget", "64", "--json", "--max-new-tokens", "3"], capsys
    )
    assert code == 0
    result = last_json(out)
    assert result["model"] == "tiny-random-llava"
    assert result["visual_tokens_in"] == 144 and result["visual_tokens_out"] == 64
    assert result["seq_len_in"] - result["seq_len_out"] == 80
    assert isinstance(result["answer"], str)


def test_run_says_plainly_that_the_demo_model_is_random(capsys):
    code, out, err = cli(
        ["run", "--model", "tiny", "--method", "pool", "--budget", "0.25", "--max-new-tokens", "2"], capsys
    )
    assert code == 0
    err = " ".join(err.split())
    assert "RANDOM-WEIGHT" in err and "meaningless" in err
    assert "144 -> 36" in " ".join(out.split())


def test_saved_model_directory_loads_offline(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    assert main(["make-tiny", str(model_dir)]) == 0
    capsys.readouterr()
    code, out, _ = cli(
        [
            "run",
            "--model",
            str(model_dir),
            "--method",
            "fastervlm",
            "--budget",
            "16",
            "--param",
            "layer=3",
            "--json",
            "--max-new-tokens",
            "2",
        ],
        capsys,
    )
    assert code == 0
    result = last_json(out)
    assert result["model"] == str(model_dir) and result["visual_tokens_out"] == 16


def test_run_compare_alternates_repeated_calls_after_a_warm_up(monkeypatch, capsys):
    """Vanilla and sieved calls alternate which goes first, after one unrecorded call each, and the output says
    what the numbers are (a median of repeats, not a benchmark)."""
    order = []
    original = LlavaForConditionalGeneration.generate

    def recording(self, *args, **kwargs):
        order.append("sieved" if self in session._SIEVED else "vanilla")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", recording)
    code, out, _ = cli(["run", "--tiny", "--compare", "--repeats", "3", "--json", "--max-new-tokens", "1"], capsys)
    assert code == 0
    assert order == ["vanilla", "sieved", "vanilla", "sieved", "sieved", "vanilla", "vanilla", "sieved"]
    result = last_json(out)
    assert len(result["timing"]["generate_s_runs"]) == 3 and len(result["vanilla"]["generate_s_runs"]) == 3
    assert result["timing"]["warmup"] == 1 and result["timing"]["alternating"]
    assert sorted(result["timing"]["generate_s_runs"])[1] == result["generate_s"]
    order.clear()
    code, out, _ = cli(["run", "--tiny", "--compare", "--repeats", "2", "--max-new-tokens", "1"], capsys)
    text = " ".join(out.split())
    assert code == 0 and "median (min-max) of 2 alternating calls each after a warm-up" in text
    assert "tokensieve bench" in text
    code, out, _ = cli(["run", "--tiny", "--max-new-tokens", "1"], capsys)
    assert "one cold call" in " ".join(out.split())


def test_run_defaults_to_the_embedded_model_on_a_benchmark_scene(capsys):
    code, out, _ = cli(["run", "--method", "pool", "--budget", "0.25", "--json", "--compare", "--repeats", "1"], capsys)
    assert code == 0
    result = last_json(out)
    assert result["model"] == "default" and result["visual_tokens_out"] == 36
    assert result["prompt"].endswith("?") and result["vanilla"]["answer"] == result["expected"]


def test_run_chains_a_pre_llm_and_an_in_llm_method(capsys):
    code, out, _ = cli(
        ["run", "--tiny", "--method", "evocut+fastv", "--budget", "64+40", "--json", "--max-new-tokens", "2"], capsys
    )
    assert code == 0
    result = last_json(out)
    assert result["method"] == "evocut+fastv" and result["visual_tokens_out"] == 64 and result["budget"] == [64, 40]
    assert abs(result["llm_visual_tokens_avg"] - 40) < 1  # 4-layer demo LM: 64, 64, then 16 from layer 2 on


def test_prompt_handling(capsys, tmp_path):
    # the placeholder is inserted for the user, and the help says so
    assert "image placeholder" in " ".join(
        build_parser()._subparsers._group_actions[0].choices["run"].format_help().split()
    )
    code, out, err = cli(["run", "--prompt", "how many shapes are there ?", "--json", "--max-new-tokens", "2"], capsys)
    assert code == 0 and err.count("warning") == 0
    plain = last_json(out)
    # a prompt that already holds the placeholder is sent as written: the default model's own template gives the
    # same answer, and the user is told
    code, out, err = cli(
        [
            "run",
            "--prompt",
            "user : <image> how many shapes are there ? assistant : ",
            "--json",
            "--max-new-tokens",
            "2",
        ],
        capsys,
    )
    assert code == 0 and last_json(out)["answer"] == plain["answer"] and "sent as written" in err
    # unknown words are named on the word-level default model
    code, out, err = cli(["run", "--prompt", "how many zebras are there ?", "--json", "--max-new-tokens", "2"], capsys)
    assert code == 0 and "'zebras'" in err and "<unk>" in err
    for bad, message in (
        ("", "--prompt is empty"),
        ("   ", "--prompt is empty"),
        ("<image> <image> what ?", "2 image placeholders"),
    ):
        code, _, err = cli(["run", "--prompt", bad], capsys)
        assert code == 2 and message in err


def test_one_grammar_for_configurations_on_every_command(tmp_path, capsys):
    # run takes one configuration; a comma points to the commands that compare several
    code, _, err = cli(["run", "--tiny", "--method", "evocut,pool"], capsys)
    assert code == 2 and "show, eval or bench" in err
    # a chain needs one budget per stage, said in command-line syntax, not Python's
    code, _, err = cli(["run", "--tiny", "--method", "evocut+fastv", "--budget", "64"], capsys)
    assert code == 2 and "joined by '+'" in err and "--budget 192+128" in err and "budget=[" not in err
    # show and bench take the same '+' chains in their ',' lists
    out_png = tmp_path / "s.png"
    code, out, _ = cli(
        ["show", "--model", "tiny", "--methods", "pool,evocut+fastv", "--budgets", "36,64+40", "--out", str(out_png)],
        capsys,
    )
    assert code == 2  # pool is one stage: it cannot take 64+40
    code, out, _ = cli(
        ["show", "--model", "tiny", "--methods", "evocut+fastv", "--budgets", "64+40,36+20", "--out", str(out_png)],
        capsys,
    )
    assert code == 0 and "evocut+fastv @ 64+40: 64 of 144 tokens" in out and "evocut+fastv @ 36+20" in out
    code, _, _ = cli(
        [
            "bench",
            "--arch",
            "tiny",
            "--methods",
            "pool,evocut+fastv",
            "--budgets",
            "36",
            "--flops-only",
            "--out",
            str(tmp_path / "b"),
        ],
        capsys,
    )
    assert code == 2
    code, _, _ = cli(
        [
            "bench",
            "--arch",
            "tiny",
            "--method",
            "evocut+fastv",
            "--budget",
            "64+40",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--new-tokens",
            "1",
            "--out",
            str(tmp_path / "b"),
        ],
        capsys,
    )
    rows = {r["config"]: r for r in json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]}
    assert code == 0 and set(rows) == {"none", "evocut+fastv@64+40"}
    assert rows["evocut+fastv@64+40"]["visual_tokens"] == 64


def test_param_on_show_and_bench(tmp_path, capsys):
    """FastV at 40 layer-averaged tokens is out of reach from layer 2 of the 4-layer tiny LM and reached from
    layer 1."""
    png = tmp_path / "s.png"
    code, _, err = cli(["show", "--model", "tiny", "--methods", "fastv", "--budgets", "40", "--out", str(png)], capsys)
    assert code == 2 and "--param fastv.layer=1" in err and not png.exists()
    code, out, _ = cli(
        [
            "show",
            "--model",
            "tiny",
            "--methods",
            "fastv",
            "--budgets",
            "40",
            "--param",
            "fastv.layer=1",
            "--out",
            str(png),
        ],
        capsys,
    )
    assert code == 0 and png.exists()
    base = [
        "bench",
        "--arch",
        "tiny",
        "--methods",
        "fastv",
        "--budgets",
        "40",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--new-tokens",
        "1",
        "--out",
        str(tmp_path / "b"),
    ]
    code, _, err = cli(base, capsys)
    assert code == 2 and "--param fastv.layer=1" in err
    code, _, _ = cli(base + ["--param", "layer=1"], capsys)
    assert code == 0
    row = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"][1]
    assert row["params"] == {"fastv": {"layer": 1}}
    assert row["llm_visual_tokens_avg"] == pytest.approx(40, abs=1)


def test_errors_say_how_to_fix_them(capsys):
    # fastv/dart name the parameter on the command line; pdrop says what it can reach and what to change
    for method in ("fastv", "dart"):
        code, _, err = cli(["run", "--method", method, "--budget", "72"], capsys)
        assert code == 2 and f"--param {method}.layer=1" in err
    code, _, err = cli(["run", "--method", "pdrop", "--budget", "30"], capsys)
    assert code == 2 and "at least 37" in err and "--method evocut+pdrop --budget 60+30" in err
    assert "do not fit" not in err
    # the suggested fix works
    assert main(["run", "--method", "evocut+pdrop", "--budget", "60+30", "--json", "--max-new-tokens", "1"]) == 0
    assert (
        main(
            [
                "run",
                "--method",
                "fastv",
                "--budget",
                "72",
                "--param",
                "fastv.layer=1",
                "--json",
                "--max-new-tokens",
                "1",
            ]
        )
        == 0
    )
