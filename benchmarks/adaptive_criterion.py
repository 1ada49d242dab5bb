"""Which per-image criterion should drive adaptive budgets, and can any image-level signal help on these data?

    python benchmarks/adaptive_criterion.py [--limit 600] [--calibration 256] [--means 36,18] [--analysis 300]

On the embedded default model. Part 1, end to end: for each method, the fixed budget, then ``Adaptive(mean)`` with
each criterion (and each ``--spans`` pair of bounds), its threshold fitted on ``--calibration`` images of the
calibration split (shapes: ``val``; easy-VQA: ``train``), measured on evenly spaced test subsets. Part 2, on the
first ``--analysis`` shapes test questions: does the criterion read the scene (Spearman correlation of the residual
at k = mean with the number of objects), does it predict the questions that pruning breaks (AUC of the residual for
"right with every token, wrong at k"), and how much an oracle that knew each question's need could gain at the same
mean. Writes ``benchmarks/results/adaptive_criterion.{md,json}``; the ``tokensieve.adaptive`` docstring quotes it.
Single thread; about an hour on a shared two-core machine with the defaults.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
from _results import machine, write

from tokensieve import Adaptive, Sieve
from tokensieve.adaptive import coverage_residuals
from tokensieve.data import calibration_samples, load, question_batches, shapes
from tokensieve.tools.evaluate import load_model, predict

METHODS = ("evocut", "divprune", "vispruner", "fastervlm")


def accuracy(answers, samples):
    right = defaultdict(list)
    for a, s in zip(answers, samples):
        right[s.family].append(a == s.answer)
    return sum(sum(v) for v in right.values()) / len(samples), {f: sum(v) / len(v) for f, v in sorted(right.items())}


def ranks(x) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's rho and the AUC)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inverse, r)
    return (sums / counts)[inverse]


def spearman(a, b) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def auc(positive, score) -> float:
    positive = np.asarray(positive, dtype=bool)
    r = ranks(score)
    n1, n0 = positive.sum(), (~positive).sum()
    return float((r[positive].sum() - n1 * (n1 - 1) / 2) / (n1 * n0))


def objects_in(index: int) -> int:
    """Objects in shapes test scene ``index`` (the scene ``shapes.sample`` draws)."""
    rng = shapes._rng("test", index)
    family = shapes.FAMILIES[index % len(shapes.FAMILIES)]
    scene = shapes.make_scene(rng)
    while family in shapes.NEEDS_TWO and len(scene.objects) < 2:
        scene = shapes.make_scene(rng)
    return len(scene.objects)


def analysis(model, processor, n: int, means: list[int], methods: list[str]) -> tuple[list[dict], list[str]]:
    samples = load("shapes", "test", n)
    objects = [objects_in(s.index) for s in samples]
    vision, projected = [], []
    with torch.inference_mode():
        for batch in question_batches(processor, samples):
            out = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
            h = out.hidden_states[model.config.vision_feature_layer][:, 1:]
            vision.append(h)
            projected.append(model.model.multi_modal_projector(h))
    spaces = {"vision features": torch.cat(vision), "projected tokens": torch.cat(projected)}
    curves = {
        (space, crit): coverage_residuals(x, max(means), "mean" if crit == "coverage" else "max").numpy()
        for space, x in spaces.items()
        for crit in ("coverage", "radius")
    }
    rows, table = (
        [],
        [
            "",
            "#### Does the criterion read the scene? (shapes test, first "
            f"{n} questions; Spearman rho of r(k = mean) with the number of objects)",
            "",
            "| criterion | space | " + " | ".join(f"mean {m}" for m in means) + " |",
            "|---|---|" + "---|" * len(means),
        ],
    )
    for (space, crit), r in curves.items():
        rhos = [spearman(r[:, m - 1], objects) for m in means]
        rows.append(dict(part="scene", criterion=crit, space=space, rho=rhos))
        table.append(f"| {crit} | {space} | " + " | ".join(f"{x:.2f}" for x in rhos) + " |")
    budgets = sorted({4, 9, 18, 36, 72} | set(means))
    table += [
        "",
        '#### Does it predict which questions a fixed budget breaks? AUC of r(k) for "right with every '
        'token, wrong at k" (0.5 = no better than chance); oracle: each question gets the smallest of '
        f"{budgets} tokens it answers right with (at least {budgets[0]}), at the same mean",
        "",
        "| method | k | fixed accuracy | broken | AUC coverage | AUC radius | oracle accuracy at mean k |",
        "|---|---|---|---|---|---|---|",
    ]
    full = np.array([a == s.answer for a, s in zip(predict(model, processor, samples).answers, samples)])
    for method in methods:
        right = {
            k: np.array(
                [
                    a == s.answer
                    for a, s in zip(predict(model, processor, samples, sieve=Sieve(method, k)).answers, samples)
                ]
            )
            for k in budgets
        }
        need = [next((k for k in budgets if right[k][j]), None) for j in range(n)]
        for m in means:
            broken = full & ~right[m]
            aucs = [auc(broken[full], curves[("vision features", c)][full, m - 1]) for c in ("coverage", "radius")]
            spent, solved = budgets[0] * n, 0
            for k in sorted(k for k in need if k is not None):
                if spent + k - budgets[0] <= m * n:
                    spent, solved = spent + k - budgets[0], solved + 1
            rows.append(
                dict(
                    part="predict",
                    method=method,
                    k=m,
                    fixed=float(right[m].mean()),
                    broken=int(broken.sum()),
                    auc=aucs,
                    oracle=solved / n,
                )
            )
            table.append(
                f"| {method} | {m} | {100 * right[m].mean():.1f} | {int(broken.sum())} | {aucs[0]:.2f} | "
                f"{aucs[1]:.2f} | {100 * solved / n:.1f} |"
            )
    return rows, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=600, help="test questions per data set (evenly spaced)")
    parser.add_argument("--calibration", type=int, default=256, help="calibration images per data set")
    parser.add_argument("--means", default="36,18")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--criteria", default="coverage,radius,scores")
    parser.add_argument("--spans", default="4:3", help="comma-separated D:M pairs: min = mean // D, max = M * mean")
    parser.add_argument("--data", default="shapes,easyvqa")
    parser.add_argument("--analysis", type=int, default=300, help="shapes questions for part 2 (0: skip)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = load_model()
    rows = []
    start = time.time()
    means = [int(m) for m in args.means.split(",")]
    methods = args.methods.split(",")
    spans = [tuple(int(x) for x in sp.split(":")) for sp in args.spans.split(",")]
    labels = [f"{c}@{d}:{m}" if len(spans) > 1 else c for c in args.criteria.split(",") for d, m in spans]
    datasets = args.data.split(",")
    for data in datasets:
        samples = load(data, "test", args.limit)
        calib = calibration_samples(data, args.calibration)
        for method in methods:
            for mean in means:
                configs = [("fixed", Sieve(method, mean))]
                for label in labels:
                    criterion, _, span = label.partition("@")
                    d, m = (int(x) for x in span.split(":")) if span else spans[0]
                    budget = Adaptive(mean, max(1, mean // d), min(144, m * mean), criterion=criterion)
                    configs.append((label, Sieve(method, budget)))
                for label, sieve in configs:
                    cal = None
                    if label != "fixed":
                        try:
                            cal = sieve.calibrate(model, question_batches(processor, calib))
                        except ValueError as exc:  # no scores (divprune): the criterion does not apply
                            print(f"{data} {method} {label}: {exc}")
                            continue
                    pred = predict(model, processor, samples, sieve=sieve)
                    acc, fam = accuracy(pred.answers, samples)
                    rows.append(
                        dict(
                            part="end to end",
                            data=data,
                            method=method,
                            mean=mean,
                            budget=label,
                            accuracy=acc,
                            families=fam,
                            test_mean=pred.kept_tokens,
                            calibration_mean=None if cal is None else cal.achieved_mean,
                            threshold=None if cal is None else cal.threshold,
                        )
                    )
                    print(
                        f"{data} {method} {mean} {label}: {100 * acc:.1f}% at {pred.kept_tokens:.2f} tokens "
                        f"({time.time() - start:.0f} s)",
                        flush=True,
                    )
    table = [
        "#### Accuracy % (mean visual tokens per test question) at the same mean: fixed against adaptive",
        "",
        "| data | method | mean | fixed | " + " | ".join(f"adaptive, {c}" for c in labels) + " |",
        "|---|---|---|---|" + "---|" * len(labels),
    ]
    keyed = {(r["data"], r["method"], r["mean"], r["budget"]): r for r in rows}
    for data in datasets:
        for method in methods:
            for mean in means:
                cells = []
                for label in ["fixed"] + labels:
                    r = keyed.get((data, method, mean, label))
                    cells.append("-" if r is None else f"{100 * r['accuracy']:.1f} ({r['test_mean']:.1f})")
                table.append(f"| {data} | {method} | {mean} | " + " | ".join(cells) + " |")
    table += [
        "",
        f"{args.limit} test questions per data set (shapes: the first, easy-VQA: evenly spaced), thresholds "
        f"fitted on {args.calibration} calibration images per data set; bounds min = mean // D, max = M x mean "
        f"(D:M = {args.spans}); `-`: the method has no scores.",
    ]
    if args.analysis:
        extra_rows, extra_table = analysis(model, processor, args.analysis, means, methods)
        rows += extra_rows
        table += extra_table
    table += ["", f"{time.time() - start:.0f} s, one thread."]
    write(args.out, "adaptive_criterion", machine(1, 1, limit=args.limit, calibration=args.calibration), rows, table)


if __name__ == "__main__":
    main()
