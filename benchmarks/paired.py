"""Paired comparison of adaptive and fixed budgets in a `tokensieve eval` result (McNemar, same questions).

    python benchmarks/paired.py benchmarks/results/eval_shapes_adaptive/results.json

For every method with both ``adaptive:N`` and ``N``, the accuracy difference (adaptive - fixed, points) and the
McNemar z of the questions only one of them answers right: ``(b - c) / sqrt(b + c)``. easy-VQA asks several
questions per image, so its z overstates somewhat.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    info = json.loads(args.results.read_text())
    records = info["records"]
    truth = info["meta"]["items"]["answer"]  # the reference answer of every question, in order
    by_key = {(r["method"], str(r["budget"])): r for r in records}
    for (method, budget), r in by_key.items():
        if not budget.startswith("adaptive:"):
            continue
        fixed = by_key.get((method, budget.split(":")[1].split("@")[0]))
        if fixed is None:
            continue
        right_a = [a == t for a, t in zip(r["answers"], truth)]
        right_f = [a == t for a, t in zip(fixed["answers"], truth)]
        b = sum(x and not y for x, y in zip(right_a, right_f))
        c = sum(y and not x for x, y in zip(right_a, right_f))
        z = (b - c) / math.sqrt(b + c) if b + c else 0.0
        diff = 100 * (sum(right_a) - sum(right_f)) / len(truth)
        print(
            f"{method:10s} {budget:14s} vs {fixed['budget']!s:4s}: {diff:+5.1f} points, z {z:+.1f} "
            f"(only adaptive right {b}, only fixed right {c})"
        )


if __name__ == "__main__":
    main()
