"""Time to first token on the CPU reference model: does compressing 576 -> k visual tokens pay off end to end?

Model: LLaVA-1.5 layout with random weights, CLIP-L/14-336 vision tower (24 layers, 577 tokens), MLP projector,
Qwen2-0.5B-sized LM (24 layers, width 896, 14 heads / 2 KV heads); fp32; a 576-placeholder prompt with 40 text
tokens. TTFT = wall time of ``generate(max_new_tokens=1)``, which includes vision, selection and prefill. Vanilla
and each method alternate within every repeat so that drift on a shared machine hits all of them alike.
Results: benchmarks/results/ttft_cpu_reference.{json,md}. `tokensieve bench` is the fuller harness (stage split,
decode, memory, FLOPs); this script stays as the minimal reproduction of the first TTFT numbers.

    python benchmarks/ttft_cpu_reference.py [--methods evocut,fastervlm,divprune] [--budget 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _results import machine, write

from tokensieve import Sieve
from tokensieve.models.archs import build_arch, synthetic_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="evocut,fastervlm,divprune")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_arch("llava15-cpu")
    batch = synthetic_inputs(model)
    print(f"built model in {time.perf_counter() - t0:.0f} s")
    runs = {"none": []} | {m: [] for m in args.methods.split(",")}
    selection = {m: [] for m in runs if m != "none"}
    gen = dict(max_new_tokens=1, do_sample=False)
    with torch.inference_mode():
        model.generate(**batch, **gen)  # warm-up
        for rep in range(args.repeats + 1):  # the first round warms each method up and is dropped
            for name in runs:
                if name == "none":
                    t = time.perf_counter()
                    model.generate(**batch, **gen)
                    elapsed = time.perf_counter() - t
                else:
                    sieve = Sieve(name, args.budget)
                    with sieve(model):
                        t = time.perf_counter()
                        model.generate(**batch, **gen)
                        elapsed = time.perf_counter() - t
                    if rep:
                        selection[name].append(sieve.last_report.selection_s)
                if rep:
                    runs[name].append(elapsed)
            print(f"repeat {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in runs.items() if v))
    base = statistics.median(runs["none"])
    rows = []
    for name, times in runs.items():
        med = statistics.median(times)
        sel = statistics.median(selection[name]) if name in selection else 0.0
        rows.append(
            dict(
                method=name,
                visual_tokens=576 if name == "none" else args.budget,
                ttft_s=med,
                min_s=min(times),
                max_s=max(times),
                speedup=base / med,
                selection_s=sel,
                selection_share=sel / med,
            )
        )
    meta = machine(args.threads, args.repeats, model="CLIP-L/14-336 + Qwen2-0.5B-sized LM, random weights, fp32")
    lines = [
        f"TTFT (generate, 1 new token), fp32, {args.threads} threads, median of {args.repeats}.",
        "",
        "| method | visual tokens | TTFT s | min-max s | speed-up | selection ms (% of TTFT) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['visual_tokens']} | {r['ttft_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} "
            f"| {r['speedup']:.2f}x | {1e3 * r['selection_s']:.1f} ({100 * r['selection_share']:.2f}%) |"
        )
    write(args.out, "ttft_cpu_reference", meta, rows, lines)


if __name__ == "__main__":
    main()
