"""`tokensieve eval` with adaptive budgets on the default model, small limits: calibrated on the calibration split
(never the test split), the fitted threshold and calibration in the record, kept tokens measured per question,
resume, ``@THRESHOLD`` without calibration, adaptive and fixed records apart, the table and the plot."""

import json

import pytest
import torch

from tokensieve import Sieve
from tokensieve.cli import main
from tokensieve.data import calibration_samples, load, question_batches
from tokensieve.tools import evaluate
from tokensieve.tools.configs import Config
from tokensieve.tools.results import markdown_table, plot

LIMIT, CALIB = 6, 8
SMALL = ["--data", "shapes", "--limit", str(LIMIT), "--batch-size", "6", "--calibration", str(CALIB)]


def results(out):
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def default():
    return evaluate.load_model("default")


@pytest.fixture
def calibrations(monkeypatch):
    """Every ``Sieve.calibrate`` call: the pixel values of the batches it saw."""
    seen = []
    real = Sieve.calibrate

    def spy(self, model, batches):
        batches = list(batches)
        seen.append(torch.cat([b["pixel_values"] for b in batches]))
        return real(self, model, batches)

    monkeypatch.setattr(Sieve, "calibrate", spy)
    return seen


def pixels(processor, samples):
    return torch.cat([b["pixel_values"] for b in question_batches(processor, samples)])


def fitted(model, processor, method, samples):
    sieve = Sieve(method, "adaptive:36")
    return sieve.calibrate(model, question_batches(processor, samples))


def test_adaptive_records_carry_the_calibration_and_the_measured_mean(tmp_path, default, calibrations, capsys):
    model, processor = default
    out = tmp_path / "ev"
    assert main(["eval", *SMALL, "--methods", "divprune", "--budgets", "36,adaptive:36", "--out", str(out)]) == 0
    seen = list(calibrations)
    data = results(out)
    records = data["records"]
    # an adaptive and a fixed budget of the same mean are two records
    assert [(r["method"], r["budget"]) for r in records] == [
        ("none", None),
        ("divprune", 36),
        ("divprune", "adaptive:36"),
    ]
    assert "adaptive" not in records[1] and records[1]["kept_tokens"] == 36
    adaptive = records[2]["adaptive"]

    # calibrated on the calibration split: the same threshold as a fit on those images, not on the test questions
    val = calibration_samples("shapes", CALIB)
    reference = fitted(model, processor, "divprune", val)
    on_test = fitted(model, processor, "divprune", load("shapes", "test", CALIB))
    assert on_test.threshold != reference.threshold  # the check below can tell the two splits apart
    assert adaptive["threshold"] == reference.threshold
    assert adaptive["budget"] == f"adaptive:36@{reference.threshold!r}"
    assert adaptive["calibration"] == {
        "data": "shapes",
        "split": "val",
        "images": CALIB,
        "sets": CALIB,
        "target_mean": 36.0,
        "mean": round(reference.achieved_mean, 4),
    }
    assert data["meta"]["calibration"]["split"] == "val" and data["meta"]["calibration"]["images"] == CALIB
    # preflight fits on the first calibration image, then the real fit on all of them; no test image is ever seen
    test_pixels = pixels(processor, load("shapes", "test", LIMIT))
    assert [len(p) for p in seen] == [1, CALIB]
    assert torch.equal(seen[0], pixels(processor, val[:1])) and torch.equal(seen[1], pixels(processor, val))
    assert not any(torch.equal(p, t) for fit_pixels in seen for p in fit_pixels for t in test_pixels)

    # kept tokens: each question's own count under the fitted rule, measured one image at a time, and their mean
    sieve = Sieve("divprune", adaptive["budget"])
    counts = []
    with sieve(model), torch.inference_mode():
        for s in load("shapes", "test", LIMIT):
            batch = next(question_batches(processor, [s]))
            model.generate(**batch, max_new_tokens=1, do_sample=False)
            counts.append(sieve.last_report.images[0].tokens_out)
    assert records[2]["kept_per_question"] == counts and len(set(counts)) > 1
    assert records[2]["kept_tokens"] == round(sum(counts) / LIMIT, 2) != 36  # measured, not the target
    assert adaptive["kept_range"] == [min(counts), max(counts)]
    table = (out / "results.md").read_text()
    assert f"| divprune | adaptive:36 | {sum(counts) / LIMIT:.1f} ({min(counts)}-{max(counts)}) |" in table
    assert f"`{adaptive['budget']}`, threshold fitted on {CALIB} `val` images" in table


def test_an_adaptive_record_is_reused_on_resume_and_refitted_for_another_calibration(tmp_path, calibrations, capsys):
    out = tmp_path / "ev"
    argv = ["eval", *SMALL, "--methods", "divprune", "--budgets", "adaptive:36,36", "--out", str(out)]
    assert main(argv) == 0
    first = results(out)["records"]
    calibrations.clear()
    capsys.readouterr()
    assert main(argv) == 0
    assert calibrations == [] and "3 finished result(s) reused, 0 to run" in capsys.readouterr().err
    assert results(out)["records"] == first
    # another calibration size is another measurement: only the adaptive record runs again, the old one is kept
    assert main([*argv, "--calibration", "4"]) == 0
    assert [len(p) for p in calibrations] == [1, 4]
    assert "2 finished result(s) reused, 1 to run" in capsys.readouterr().err
    records = results(out)["records"]
    assert [(r["budget"], (r.get("adaptive") or {}).get("calibration", {}).get("images")) for r in records] == [
        (None, None),
        ("adaptive:36", 4),
        (36, None),
        ("adaptive:36", CALIB),
    ]
    assert records[1]["adaptive"]["threshold"] != first[1]["adaptive"]["threshold"]


def test_a_given_threshold_runs_as_is_and_reproduces_the_calibrated_run(tmp_path, calibrations, capsys):
    calibrated, given, merged = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    assert main(["eval", *SMALL, "--methods", "evocut", "--budgets", "adaptive:36", "--out", str(calibrated)]) == 0
    fit = results(calibrated)["records"][1]
    calibrations.clear()
    spelled = fit["adaptive"]["budget"]
    assert main(["eval", *SMALL, "--methods", "evocut", "--budgets", spelled, "--out", str(given)]) == 0
    assert calibrations == []
    data = results(given)
    reused = data["records"][1]
    assert "calibration" not in data["meta"] and reused["budget"] == spelled
    assert reused["adaptive"]["calibration"] is None and reused["adaptive"]["threshold"] == fit["adaptive"]["threshold"]
    # the same threshold keeps the same counts and gives the same answers
    assert reused["kept_per_question"] == fit["kept_per_question"] and reused["answers"] == fit["answers"]
    assert "threshold given, no calibration" in (given / "results.md").read_text()
    # --from merges them as two records (the budget as given is part of the key)
    assert main(["eval", "--from", str(calibrated), "--from", str(given), "--out", str(merged)]) == 0
    assert [r["budget"] for r in results(merged)["records"]] == [None, "adaptive:36", spelled]


def test_preflight_calibrates_adaptive_budgets_and_names_the_one_that_cannot_run(
    tmp_path, default, calibrations, capsys, monkeypatch
):
    out = tmp_path / "ev"
    calls = []
    real = evaluate.predict
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: (calls.append(len(a[2])), real(*a, **k))[1])
    # FastV's default layer 2 cannot reach 72 layer-averaged tokens on the 4-layer default LM, adaptive or not
    assert main(["eval", *SMALL, "--methods", "divprune,fastv", "--budgets", "adaptive:72", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of 2 configuration(s) cannot run" in err and "fastv@adaptive:72" in err and "divprune@" not in err
    assert set(calls) == {1} and [len(p) for p in calibrations] == [1, 1]  # one image each, nothing evaluated
    assert not out.joinpath("results.json").exists()
    # without a calibration set, an uncalibrated budget is a clear error, not a crash
    model, processor = default

    with pytest.raises(ValueError, match="has no threshold yet and no calibration set"):
        evaluate.evaluate(
            model, processor, load("shapes", "test", 2), [Config.single("divprune", "adaptive:36")], progress=False
        )


def test_preflight_also_runs_an_adaptive_budget_at_its_smallest_count(default, monkeypatch):
    """Whether some test image gets an adaptive budget's smallest count depends on the model and the images, so the
    preflight runs that count itself: with ``adaptive:72`` every image keeps 72 // 4 = 18 tokens there."""
    model, processor = default
    floor = evaluate._at_floor(Config.single("divprune", "adaptive:72"))
    assert floor.budgets == ("adaptive:72@1e+30",) and not floor.needs_calibration
    samples = load("shapes", "test", 2)
    pred = evaluate.predict(model, processor, samples, sieve=floor.sieve(), batch_size=2, max_new_tokens=1)
    assert pred.kept_per_question == [18, 18]
    seen = []
    real = evaluate.predict
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: (seen.append(k["sieve"]), real(*a, **k))[1])
    fixed = [Config.single("divprune", 36), Config.single("divprune", "adaptive:72@0.5")]
    evaluate.preflight(model, processor, samples, fixed, {}, "image")
    assert len(seen) == 3  # the fixed budget once, the adaptive one as given and at its floor


def test_table_and_plot_put_adaptive_next_to_fixed(monkeypatch, tmp_path):
    import matplotlib.axes

    def rec(method, budget, kept, acc, **extra):
        return {
            "method": method,
            "budget": budget,
            "scope": "image",
            "params": {},
            "kept_tokens": kept,
            "accuracy": acc,
            "relative": 1.0,
            "loyalty": 1.0,
            "families": {"a": acc},
            "questions": 10,
            **extra,
        }

    def adaptive(budget, kept, acc):
        return rec(
            "evocut",
            budget,
            kept,
            acc,
            adaptive={
                "budget": budget + "@0.1",
                "criterion": "coverage",
                "min": None,
                "max": None,
                "threshold": 0.1,
                "kept_range": [4, 50],
                "calibration": {"data": "shapes", "split": "val", "images": 16, "mean": 18.0},
            },
        )

    records = [
        rec("none", None, 144, 0.9),
        rec("evocut", 36, 36, 0.8),
        rec("evocut", 18, 18, 0.6),
        adaptive("adaptive:36", 37.25, 0.7),
        adaptive("adaptive:18", 17.5, 0.65),
        rec("divprune", 36, 36, 0.5),
    ]
    table = markdown_table(records).splitlines()
    rows = [line.split(" | ")[1] for line in table if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["-", "36", "adaptive:36", "18", "adaptive:18", "36"]
    assert "| evocut | adaptive:18 | 17.5 (4-50) | 65.0 |" in "\n".join(table)
    lines = {}
    monkeypatch.setattr(
        matplotlib.axes.Axes, "plot", lambda self, x, y, **k: lines.setdefault(k.get("label"), (list(x), list(y), k))
    )
    plot(records, tmp_path / "p.png")
    assert set(lines) >= {"evocut", "evocut adaptive", "divprune"}
    fixed, adapt = lines["evocut"], lines["evocut adaptive"]
    assert adapt[0] == [17.5, 37.25] and adapt[1] == [65.0, 70.0]  # measured means on the x-axis
    assert adapt[2]["color"] == fixed[2]["color"] != lines["divprune"][2]["color"]
    assert (adapt[2]["linestyle"], adapt[2]["marker"]) != (fixed[2]["linestyle"], fixed[2]["marker"])
