"""tokensieve inside lmms-eval against `tokensieve eval`, and the wrapper's speed against lmms-eval's `llava_hf`.

Needs the lmms-eval extra (README, "Evaluating with lmms-eval"). Two parts:

``accuracy``: the full easy-VQA (9,673) and shapes (2,004) test sets through `tokensieve lmms-eval` (batch 8) for
``none`` and EvoCut at 0.5 (72 of 144 tokens), and the same questions through `tokensieve eval`'s own code
(``tokensieve.tools.evaluate.predict``, batch 32, what `tokensieve eval` without --limit runs). Compared: accuracy and
the answer to every question. Also the lmms-eval answers restricted to the README tables' subsets (easy-VQA: the
1,000 evenly spaced questions of `--limit 1000`; shapes: the first 1,002, which `--limit 1002` takes there) against
the committed `benchmarks/results/eval_*/results.json` that those tables quote.

``timing`` (run it under ``flock /work/wt/timing.lock``): time per question of the generation phase of lmms-eval
(``generate_until`` on all requests: building the chat prompt, processing, generating, decoding) on the first N
easy-VQA questions, unpruned, for `--model tokensieve` at batch 8 and 1 and stock `--model llava_hf` (lmms-eval's
chat wrapper, batch 1 only), interleaved over repeats in one process with one thread, after a dropped warm-up round.

    python benchmarks/lmms_eval_check.py accuracy
    flock /work/wt/timing.lock python benchmarks/lmms_eval_check.py timing --questions 400 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import machine, write  # noqa: E402

TASKS = {"easyvqa": "tokensieve_easyvqa", "shapes": "tokensieve_shapes"}
METHODS = {"none": "method=none", "evocut": "method=evocut,budget=0.5"}
README_SUBSET = {"easyvqa": 1000, "shapes": 1002}


def load_avg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def lmms_eval_answers(method: str, limit: int | None) -> dict:
    """Per data set: {doc_id: answer}, the accuracy lmms-eval reported, and the run's throughput section."""
    out = Path(tempfile.mkdtemp(prefix="lmms_eval_check_"))
    cmd = [
        str(Path(sys.executable).parent / "tokensieve"),
        "lmms-eval",
        "--model_args",
        "pretrained=default," + METHODS[method],
        "--tasks",
        ",".join(TASKS.values()),
        "--batch_size",
        "8",
        "--output_path",
        str(out),
        "--log_samples",
    ] + ([] if limit is None else ["--limit", str(limit)])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode:
        raise SystemExit(f"lmms-eval run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    got = {"wall_s": time.perf_counter() - t0, "throughput": results["throughput"]}
    for name, task in TASKS.items():
        lines = next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()
        answers = {}
        for line in lines:
            s = json.loads(line)
            resp = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
            answers[s["doc_id"]] = resp.strip().lower()
        got[name] = {"answers": answers, "accuracy": results["results"][task]["exact_match,none"]}
    return got


def tokensieve_answers(name: str, method: str, limit: int | None) -> tuple[list[str], list[str]]:
    from tokensieve import Sieve
    from tokensieve.data import easyvqa, shapes
    from tokensieve.data.shapes import Sample
    from tokensieve.tools.evaluate import load_model, predict

    if name == "easyvqa":  # every question in the package's order (dataset(limit=...) would space them out)
        qs = easyvqa.questions("test")[:limit]
        samples = [
            Sample(easyvqa.load_image("test", im), q, a, easyvqa.family(a), i) for i, (q, a, im) in enumerate(qs)
        ]
    else:
        samples = shapes.dataset("test", limit)
    model, processor = load_model(None)
    sieve = None if method == "none" else Sieve("evocut", 0.5)
    return predict(model, processor, samples, sieve=sieve, batch_size=32).answers, [s.answer for s in samples]


def accuracy_part(args) -> None:
    rows, table = (
        [],
        [
            "| data set | method | questions | lmms-eval accuracy | tokensieve eval accuracy | answers that differ "
            "| README subset (lmms-eval / committed table) |",
            "|---|---|---|---|---|---|---|",
        ],
    )
    committed = {n: json.loads((ROOT / f"benchmarks/results/eval_{n}/results.json").read_text()) for n in TASKS}
    for method in METHODS:
        lm = lmms_eval_answers(method, args.limit)
        for name in TASKS:
            ref, targets = tokensieve_answers(name, method, args.limit)
            got = [lm[name]["answers"][i] for i in range(len(ref))]
            ref_acc = sum(a == t for a, t in zip(ref, targets)) / len(ref)
            differ = sum(a != b for a, b in zip(got, ref))
            n_sub = README_SUBSET[name]
            subset = [i * len(ref) // n_sub for i in range(n_sub)] if name == "easyvqa" else list(range(n_sub))
            sub_acc = sub_table = None
            if args.limit is None:
                sub_acc = sum(got[i] == targets[i] for i in subset) / n_sub
                rec = [r for r in committed[name] if r["method"] == method and (method == "none" or r["budget"] == 0.5)]
                sub_table = rec[0]["accuracy"]
            row = dict(
                data=name,
                method=method,
                questions=len(ref),
                lmms_eval_accuracy=lm[name]["accuracy"],
                tokensieve_eval_accuracy=ref_acc,
                answers_differ=differ,
                readme_subset_lmms_eval=sub_acc,
                readme_subset_committed=sub_table,
                lmms_eval_wall_s=lm["wall_s"],
                throughput=lm["throughput"],
            )
            rows.append(row)
            table.append(
                f"| {name} | {method if method == 'none' else 'evocut 0.5 (72 tokens)'} | {len(ref)} | "
                f"{100 * lm[name]['accuracy']:.2f} | {100 * ref_acc:.2f} | {differ} | "
                + ("-" if sub_acc is None else f"{100 * sub_acc:.1f} / {100 * sub_table:.1f} (n={n_sub})")
                + " |"
            )
            print(table[-1], flush=True)
    meta = machine(
        1, 1, load_avg_after=load_avg(), limit=args.limit, command="python benchmarks/lmms_eval_check.py accuracy"
    )
    write(args.out, "lmms_eval_accuracy", meta, rows, table)


def timing_part(args) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from tokensieve.lmms_eval import TASKS_DIR
    from tokensieve.tools.evaluate import DEFAULT_MODEL_DIR

    configs = {
        "tokensieve, batch 8": ("tokensieve", "pretrained=default,method=none", 8),
        "tokensieve, batch 1": ("tokensieve", "pretrained=default,method=none", 1),
        "llava_hf (stock), batch 1": (
            "llava_hf",
            f"pretrained={DEFAULT_MODEL_DIR},device_map=cpu,dtype=float32,device=cpu",
            1,
        ),
    }
    manager = TaskManager("WARNING", include_path=str(TASKS_DIR))
    times: dict[str, list[float]] = {k: [] for k in configs}
    accuracy: dict[str, float] = {}
    loads = [load_avg()]
    for r in range(-1, args.repeats):  # round -1 warms every wrapper up on a few questions and is dropped
        order = list(configs)[r % len(configs) :] + list(configs)[: r % len(configs)]
        questions = min(16, args.questions) if r < 0 else args.questions
        for name in order:
            model, model_args, batch = configs[name]
            lm = get_model(model).create_from_arg_string(model_args, {"batch_size": batch})
            spent = []
            inner = lm.generate_until

            def timed(requests, inner=inner, spent=spent):
                t0 = time.perf_counter()
                out = inner(requests)
                spent.append(time.perf_counter() - t0)
                return out

            lm.generate_until = timed  # this instance only: the generation phase, not loading or scoring
            res = simple_evaluate(
                model=lm, tasks=["tokensieve_easyvqa"], limit=questions, task_manager=manager, batch_size=batch
            )
            print(f"repeat {r}: {name}: {1e3 * sum(spent) / questions:.1f} ms/question", flush=True)
            if r >= 0:
                times[name].append(sum(spent) / questions)
                accuracy[name] = res["results"]["tokensieve_easyvqa"]["exact_match,none"]
        loads.append(load_avg())
    base = statistics.median(times["llava_hf (stock), batch 1"])
    rows, table = (
        [],
        ["| wrapper | ms per question (median, min-max) | speed-up vs llava_hf | accuracy |", "|---|---|---|---|"],
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(config=name, seconds_per_question=ts, median=med, accuracy=accuracy[name]))
        table.append(
            f"| {name} | {1e3 * med:.1f} ({1e3 * min(ts):.1f}-{1e3 * max(ts):.1f}) | {base / med:.2f}x | "
            f"{100 * accuracy[name]:.1f} |"
        )
    meta = machine(
        1,
        args.repeats,
        questions=args.questions,
        load_avg=loads,
        command=f"flock /work/wt/timing.lock python benchmarks/lmms_eval_check.py timing "
        f"--questions {args.questions} --repeats {args.repeats}",
    )
    write(args.out, "lmms_eval_timing", meta, rows, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("accuracy", "timing"))
    parser.add_argument("--limit", type=int, help="accuracy: only the first N questions of each set (a quick check)")
    parser.add_argument("--questions", type=int, default=400, help="timing: first N easy-VQA questions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    accuracy_part(args) if args.part == "accuracy" else timing_part(args)


if __name__ == "__main__":
    main()
