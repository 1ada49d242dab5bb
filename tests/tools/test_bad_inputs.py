"""A scripted sweep of bad input over run, eval, show and bench: every case exits non-zero with one line that names
the problem and the fix, no traceback, and no earlier result is touched."""

import json
from pathlib import Path

import pytest

from tokensieve.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Files a newcomer might point the commands at."""
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("not an image\n")
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes((ROOT / "examples" / "scene.png").read_bytes()[:200])
    (d / "folder").mkdir()
    (d / "file").write_text("x")
    from transformers import BertConfig, LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        d / "llama"
    )
    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        d / "bert"
    )
    (d / "no_config").mkdir()
    return d


IMAGES = [
    ("notes.txt", "not an image file"),
    ("empty.png", "empty (0-byte)"),
    ("truncated.png", "truncated"),
    ("folder", "is a folder"),
    ("missing.png", "no such file"),
]
MODELS = [
    ("llama", "not a vision-language model; tokensieve supports LlavaForConditionalGeneration"),
    ("bert", "not a vision-language model"),
    ("no_config", "has no config.json"),
    ("file", "is a file; give the model's folder"),
    ("missing", "no such folder"),
]
BUDGETS = [
    ("0", "at least one token"),
    ("-3", "at least one token"),
    ("2.5", "(0, 1]"),
    ("abc", "neither an int"),
    ("", "give one or more budgets"),
    ("64+32", "1 stage(s) but"),
]

CASES = (
    [(["run", "--image", "{bad}/" + f], m) for f, m in IMAGES]
    + [(["show", "--image", "{bad}/" + f, "--out", "{tmp}/s.png"], m) for f, m in IMAGES]
    + [(["bench", "--model", "default", "--image", "{bad}/" + f, "--out", "{tmp}/b"], m) for f, m in IMAGES]
    + [(["run", "--model", "{bad}/" + f], m) for f, m in MODELS]
    + [(["eval", "--model", "{bad}/" + f, "--out", "{tmp}/ev"], m) for f, m in MODELS]
    + [(["show", "--model", "{bad}/" + f, "--out", "{tmp}/s.png"], m) for f, m in MODELS]
    + [(["bench", "--model", "{bad}/" + f, "--out", "{tmp}/b"], m) for f, m in MODELS]
    + [(["run", "--budget", b], m) for b, m in BUDGETS]
    + [(["eval", "--budgets", b, "--out", "{tmp}/ev"], m) for b, m in BUDGETS]
    + [(["show", "--budgets", b, "--out", "{tmp}/s.png"], m) for b, m in BUDGETS]
    + [(["bench", "--arch", "tiny", "--budgets", b, "--out", "{tmp}/b"], m) for b, m in BUDGETS]
    + [
        (["run", "--budget", "1000"], "exceeds the 144 visual tokens"),
        (["run", "--budget", "adaptive:16"], "needs its threshold here (adaptive:16@T)"),
        (["show", "--budgets", "adaptive:16", "--out", "{tmp}/s.png"], "tokensieve eval --budgets adaptive:16"),
        (["bench", "--arch", "tiny", "--budgets", "adaptive:16", "--out", "{tmp}/b"], "needs its threshold here"),
        (["bench", "--arch", "tiny", "--budgets", "1000", "--out", "{tmp}/b"], "exceeds the 144 visual tokens"),
        (["run", "--method", "nope"], "unknown method 'nope'; available:"),
        (["show", "--methods", "evocut,bogus", "--out", "{tmp}/s.png"], "unknown method 'bogus'"),
        (["bench", "--arch", "tiny", "--methods", "evocut,nope", "--out", "{tmp}/b"], "unknown method 'nope'"),
        (["bench", "--arch", "nope", "--out", "{tmp}/b"], "unknown architecture 'nope'; known:"),
        *(
            [(["bench", "--arch", "tiny", "--device", "cuda", "--out", "{tmp}/b"], "has no usable CUDA device")]
            if not __import__("torch").cuda.is_available()
            else []
        ),
        (["run", "--method", "fastv", "--budget", "72"], "--param fastv.layer=1"),
        (["eval", "--methods", "evocut,fastv", "--budgets", "72", "--out", "{tmp}/ev2"], "--param fastv.layer=1"),
        (["run", "--param", "alpha=3.0"], "alpha"),
        (["run", "--param", "evocut.nope=1"], "evocut has no parameter 'nope'"),
        (["run", "--scope", "crops"], "invalid choice: 'crops'"),
        (["eval", "--limit", "0", "--out", "{tmp}/ev"], "--limit: must be >= 1"),
        (["eval", "--limit", "-5", "--out", "{tmp}/ev"], "--limit: must be >= 1"),
        (["eval", "--limit", "ten", "--out", "{tmp}/ev"], "expected a whole number"),
        (["eval", "--batch-size", "0", "--out", "{tmp}/ev"], "--batch-size: must be >= 1"),
        (["bench", "--arch", "tiny", "--repeats", "0", "--out", "{tmp}/b"], "--repeats: must be >= 1"),
        (["bench", "--arch", "tiny", "--new-tokens", "0", "--out", "{tmp}/b"], "--new-tokens: must be >= 1"),
        (["run", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
        (["run", "--prompt", ""], "--prompt is empty"),
        (["run", "--prompt", "  "], "--prompt is empty"),
        (["bench", "--model", "default", "--prompt", "", "--out", "{tmp}/b"], "--prompt is empty"),
        (["eval", "--out", "{bad}/file"], "is a file, not a folder"),
        (["eval", "--out", "{bad}/file/sub"], "which is a file"),
        (["bench", "--arch", "tiny", "--out", "{bad}/file"], "is a file, not a folder"),
        (["show", "--out", "{bad}/folder"], "is a folder; give a file name"),
        (["show", "--out", "{tmp}/s.txt"], "give a file name ending in .png"),
        (["show", "--out", "{bad}/file/s.png"], "which is a file"),
        (["eval", "--from", "{bad}/folder", "--out", "{tmp}/ev"], "no results.json there"),
        (["eval", "--from", "{bad}/notes.txt", "--out", "{tmp}/ev"], "not a tokensieve eval result"),
        (["make-tiny", "{bad}/file"], "is a file, not a folder"),
        (["run", "--tiny", "--model", "x"], "either --model or --tiny"),
    ]
)


CASES = [
    (argv + ["--limit", "2"] if argv[0] == "eval" and "--limit" not in argv and "--from" not in argv else argv, m)
    for argv, m in CASES
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_input_is_one_clear_line(argv, message, bad, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default outputs (show.png, bench-results) would land here
    # an earlier result in the output folder must survive every failure
    (tmp_path / "ev").mkdir()
    earlier = json.dumps({"format": 2, "meta": None, "records": []})
    (tmp_path / "ev" / "results.json").write_text(earlier)
    argv = [a.format(bad=bad, tmp=tmp_path) for a in argv]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0, out
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert errors[0].startswith(f"tokensieve {argv[0]}: error: ")
    assert message in errors[0], errors[0]
    assert (tmp_path / "ev" / "results.json").read_text() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) in (["ev"], ["b", "ev"], ["ev", "ev2"])
