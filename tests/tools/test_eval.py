"""`tokensieve eval` on small subsets: outputs that mean what they say, checks before work, no lost work, resume,
metadata, re-plotting and merging."""

import json

import pytest

import tokensieve
from tokensieve.cli import build_parser, main
from tokensieve.data import shapes
from tokensieve.tools import evaluate

SMALL = ["--data", "shapes", "--limit", "6", "--batch-size", "6"]


def results(out):
    return json.loads((out / "results.json").read_text())


def test_eval_writes_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "ev"
    code = main(
        [
            "eval",
            "--data",
            "shapes",
            "--methods",
            "random,pool",
            "--budgets",
            "0.25,16",
            "--limit",
            "12",
            "--batch-size",
            "6",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    records = results(out)["records"]
    assert [(r["method"], r["budget"]) for r in records] == [
        ("none", None),
        ("random", 0.25),
        ("random", 16),
        ("pool", 0.25),
        ("pool", 16),
    ]
    vanilla = records[0]
    assert vanilla["kept_tokens"] == 144 and vanilla["loyalty"] == 1.0 and vanilla["relative"] == 1.0
    assert [r["kept_tokens"] for r in records[1:]] == [36, 16, 36, 16]
    for r in records:
        assert r["questions"] == 12 and set(r["families"]) == {
            "count",
            "exist",
            "position",
            "relation",
            "smallest",
            "digit",
        }
        assr = r["accuracy"]
        assert abs(r["relative"] - assr / vanilla["accuracy"]) < 1e-9
        # per-family accuracies (two questions each here) average to the overall accuracy
        assert abs(sum(r["families"].values()) / 6 - assr) < 1e-9
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(records) and "| pool | 16 | 16.0 |" in table
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the table printed to a pipe is the markdown itself, one line per row, not squeezed to 80 columns
    printed = capsys.readouterr().out
    assert all(line in printed.splitlines() for line in table.splitlines() if line.startswith("| "))


def test_results_carry_metadata_and_per_question_answers(tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", *SMALL, "--methods", "pool", "--budgets", "36", "--out", str(out)]) == 0
    data = results(out)
    meta = data["meta"]
    assert meta["tokensieve"] == tokensieve.__version__ and meta["data"] == "shapes" and meta["limit"] == 6
    assert meta["model"]["model"] == "default" and len(meta["model"]["config_sha256"]) == 64
    assert meta["model"]["weights"]["model.safetensors"]["bytes"] > 1e6
    assert meta["questions"] == 6 and meta["items"]["family"] == list(shapes.FAMILIES)
    assert meta["items"]["question"][0] == shapes.sample("test", 0).question
    for r in data["records"]:
        assert len(r["answers"]) == 6
        right = sum(a == truth for a, truth in zip(r["answers"], meta["items"]["answer"]))
        assert right / 6 == r["accuracy"]
    # lists of plain values take one line each, so a thousand answers do not make a thousand lines
    text = (out / "results.json").read_text()
    assert '"answers": ["' in text and text.count("\n") < 200


def test_eval_passes_method_scoped_params_and_refuses_unscoped_ones(tmp_path, capsys):
    out = tmp_path / "ev"
    # FastV's default layer 2 cannot reach 72 layer-averaged tokens on the 4-layer default LM (at least 73); layer 1 can
    assert main(["eval", *SMALL, "--methods", "fastv", "--budgets", "72", "--out", str(out)]) == 2
    assert "--param fastv.layer=1" in capsys.readouterr().err
    assert (
        main(["eval", *SMALL, "--methods", "fastv", "--budgets", "72", "--param", "fastv.layer=1", "--out", str(out)])
        == 0
    )
    records = results(out)["records"]
    assert records[1]["params"] == {"fastv": {"layer": 1}} and abs(records[1]["kept_tokens"] - 72) < 1.5
    capsys.readouterr()
    assert (
        main(["eval", *SMALL, "--methods", "fastv,pool", "--budgets", "72", "--param", "layer=1", "--out", str(out)])
        == 2
    )
    assert "--param fastv.layer=1" in capsys.readouterr().err


def test_everything_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """An unreachable in-LLM budget fails after the model loads but before the baseline or any method runs; a bad
    --out fails before the model loads; a results file already in --out is left exactly as it was."""
    out = tmp_path / "ev"
    assert main(["eval", *SMALL, "--methods", "pool", "--budgets", "36", "--out", str(out)]) == 0
    before = (out / "results.json").read_bytes()
    calls = []
    real = evaluate.predict
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: (calls.append(len(a[2])), real(*a, **k))[1])
    capsys.readouterr()
    assert main(["eval", *SMALL, "--methods", "pool,evocut,fastv", "--budgets", "100,72", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tokensieve eval: error: 1 of 6 configuration(s) cannot run on this model")
    assert "fastv@72" in err[-1] and "fastv@100" not in err[-1] and "--param fastv.layer=1" in err[-1]
    assert calls and set(calls) == {1}  # only the one-question preflight ran
    assert (out / "results.json").read_bytes() == before

    def no_model(*a, **k):
        raise AssertionError("the model must not load before the output folder is checked")

    monkeypatch.setattr(evaluate, "load_model", no_model)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["eval", *SMALL, "--out", str(blocker / "sub")]) == 2
    assert "which is a file" in capsys.readouterr().err


def test_an_interrupted_eval_keeps_finished_work_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ev"
    argv = ["eval", *SMALL, "--methods", "random,pool", "--budgets", "36", "--out", str(out)]
    real = evaluate.predict
    calls = []

    def interrupting(*a, **k):
        if len(a[2]) > 1:  # not the one-question preflight
            calls.append(k.get("sieve"))
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "predict", interrupting)
    try:
        code = main(argv)
    except KeyboardInterrupt:  # the command must turn Ctrl-C into a message and an exit code
        code = "escaped"
    assert code == 130
    err = capsys.readouterr().err
    assert "2 of 3 results are saved" in err and "run the same command again" in err
    saved = results(out)["records"]
    assert [r["method"] for r in saved] == ["none", "random"] and (out / "results.png").exists()
    calls.clear()
    assert main(argv) == 0
    assert len(calls) == 1 and calls[0].name == "pool"  # only what was missing ran
    assert "2 finished result(s) reused, 1 to run" in capsys.readouterr().err
    resumed = results(out)["records"]
    assert resumed[:2] == saved and [r["method"] for r in resumed] == ["none", "random", "pool"]
    # the same numbers as one uninterrupted run
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(evaluate, "predict", real)
    assert main([*argv[:-1], str(fresh)]) == 0
    assert results(fresh)["records"] == resumed
    # a different evaluation is not mixed into these results; --fresh replaces them
    capsys.readouterr()
    assert (
        main(["eval", "--data", "easyvqa", "--limit", "6", "--methods", "pool", "--budgets", "36", "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert "another evaluation" in err and "data: 'shapes' vs 'easyvqa'" in err and "--fresh" in err
    assert (
        main(
            [
                "eval",
                "--data",
                "easyvqa",
                "--limit",
                "6",
                "--methods",
                "pool",
                "--budgets",
                "36",
                "--out",
                str(out),
                "--fresh",
            ]
        )
        == 0
    )
    assert results(out)["meta"]["data"] == "easyvqa"


def test_from_replots_and_merges_earlier_results(tmp_path, capsys):
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    assert main(["eval", *SMALL, "--methods", "pool", "--budgets", "36", "--out", str(a)]) == 0
    assert main(["eval", *SMALL, "--methods", "random,pool", "--budgets", "36,18", "--out", str(b)]) == 0
    assert main(["eval", "--from", str(a), "--from", str(b / "results.json"), "--out", str(merged)]) == 0
    records = results(merged)["records"]
    assert [(r["method"], r["budget"]) for r in records] == [
        ("none", None),
        ("pool", 36),
        ("random", 36),
        ("random", 18),
        ("pool", 18),
    ]
    assert records[1] == results(a)["records"][1]
    table = (merged / "results.md").read_text()
    assert table.startswith("### shapes test (6 questions), default model") and table.count("\n| ") == 6
    assert (merged / "results.png").stat().st_size > 5000
    # a legacy file (a bare list of records) re-plots too
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "results.json").write_text(json.dumps(results(a)["records"]))
    assert main(["eval", "--from", str(legacy), "--out", str(tmp_path / "replot")]) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    assert (
        main(["eval", "--data", "easyvqa", "--limit", "6", "--methods", "pool", "--budgets", "36", "--out", str(other)])
        == 0
    )
    capsys.readouterr()
    assert main(["eval", "--from", str(a), "--from", str(other), "--out", str(tmp_path / "x")]) == 2
    assert "different evaluations" in capsys.readouterr().err
    assert main(["eval", "--from", str(a), "--methods", "pool", "--out", str(tmp_path / "x")]) == 2
    assert "runs no model" in capsys.readouterr().err


def test_limit_help_matches_what_it_does():
    from tokensieve.data import easyvqa, load

    ev = build_parser()._subparsers._group_actions[0].choices["eval"]
    text = " ".join(ev.format_help().split())
    assert "shapes takes its first N" in text and "easy-VQA N evenly spaced" in text
    full = easyvqa.questions("test")
    subset = load("easyvqa", "test", 4)
    assert (
        [s.question for s in subset] == [full[i * len(full) // 4][0] for i in range(4)] != [q for q, _, _ in full[:4]]
    )
    assert [s.index for s in load("shapes", "test", 3)] == [0, 1, 2]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--limit", "0"], "argument --limit: must be >= 1, got 0"),
        (["--limit", "-5"], "argument --limit: must be >= 1, got -5"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--calibration", "0"], "argument --calibration: must be >= 1, got 0"),
        (["--budgets", ""], "--budgets '': give one or more budgets"),
        (["--methods", ""], "--methods '': give one or more method names"),
    ],
)
def test_eval_refuses_nonsense_counts_and_empty_lists(argv, message, tmp_path, capsys):
    out = tmp_path / "ev"
    small = [] if "--limit" in argv else ["--limit", "2"]
    assert main(["eval", "--out", str(out), *small, *argv]) == 2
    assert message in capsys.readouterr().err and not (out / "results.json").exists()


def test_the_same_model_elsewhere_is_the_same_evaluation(tmp_path, capsys):
    """Resuming compares the model's config and weights, not its folder: a copy elsewhere resumes, other weights
    do not."""
    import shutil

    from tokensieve.models.loading import EMBEDDED_MODELS

    copy = tmp_path / "copy"
    shutil.copytree(EMBEDDED_MODELS["default"].path, copy)
    out = tmp_path / "ev"
    assert main(["eval", *SMALL, "--methods", "pool", "--budgets", "36", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", *SMALL, "--model", str(copy), "--methods", "pool", "--budgets", "36", "--out", str(out)]) == 0
    assert "2 finished result(s) reused, 0 to run" in capsys.readouterr().err
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # other weights
    weights.write_bytes(bytes(data))
    assert main(["eval", *SMALL, "--model", str(copy), "--methods", "pool", "--budgets", "36", "--out", str(out)]) == 2
    assert "model (weights differ)" in capsys.readouterr().err
