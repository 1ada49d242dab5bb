"""Full-token accuracy of a checkpoint on evenly spaced subsets of both test sets, per question family.

    python benchmarks/quick_accuracy.py DIR [N]

A few seconds per checkpoint, so training runs can be compared at equal steps (``train_default.py
--checkpoint-every`` writes the checkpoints); ``tokensieve eval`` is the full method x budget study.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from tokensieve.data import load
from tokensieve.tools.evaluate import load_model, predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("n", nargs="?", type=int, default=300, help="questions per test set (evenly spaced)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model_dir)
    for data in ("shapes", "easyvqa"):
        samples = load(data, "test", args.n)
        answers = predict(model, processor, samples, batch_size=50).answers
        right = defaultdict(list)
        for answer, sample in zip(answers, samples):
            right[sample.family].append(answer == sample.answer)
        total = sum(sum(v) for v in right.values()) / len(samples)
        families = ", ".join(f"{k} {100 * sum(v) / len(v):.0f}" for k, v in sorted(right.items()))
        print(f"{data}: {100 * total:.1f}% ({families})")


if __name__ == "__main__":
    main()
