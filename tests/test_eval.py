"""`tokensieve eval` on a small subset: the three outputs, and records that mean what they say."""

import json

from tokensieve.cli import main


def test_eval_writes_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "ev"
    code = main(["eval", "--data", "shapes", "--methods", "random,pool", "--budgets", "0.25,16", "--limit", "12",
                 "--batch-size", "6", "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    records = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["budget"]) for r in records] == [
        ("none", None), ("random", 0.25), ("random", 16), ("pool", 0.25), ("pool", 16)]
    vanilla = records[0]
    assert vanilla["kept_tokens"] == 144 and vanilla["loyalty"] == 1.0 and vanilla["relative"] == 1.0
    assert [r["kept_tokens"] for r in records[1:]] == [36, 16, 36, 16]
    for r in records:
        assert r["questions"] == 12 and set(r["families"]) == {"count", "exist", "position", "relation",
                                                               "smallest", "digit"}
        assr = r["accuracy"]
        assert abs(r["relative"] - assr / vanilla["accuracy"]) < 1e-9
        # per-family accuracies (two questions each here) average to the overall accuracy
        assert abs(sum(r["families"].values()) / 6 - assr) < 1e-9
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(records) and "| pool | 16 | 16.0 |" in table
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_eval_passes_method_scoped_params_and_refuses_unscoped_ones(tmp_path, capsys):
    out = tmp_path / "ev"
    # FastV's default layer 2 cannot reach 72 layer-averaged tokens on the 3-layer default LM (at least 97); layer 1 can
    assert main(["eval", "--data", "shapes", "--methods", "fastv", "--budgets", "72", "--limit", "6",
                 "--batch-size", "6", "--out", str(out)]) == 2
    assert "layer" in capsys.readouterr().out
    assert main(["eval", "--data", "shapes", "--methods", "fastv", "--budgets", "72", "--limit", "6",
                 "--batch-size", "6", "--param", "fastv.layer=1", "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())
    assert records[1]["params"] == {"layer": 1} and abs(records[1]["kept_tokens"] - 72) < 1.5
    assert main(["eval", "--data", "shapes", "--methods", "fastv", "--budgets", "72", "--param", "layer=1",
                 "--out", str(out)]) == 2
    assert "METHOD.NAME" in capsys.readouterr().out
