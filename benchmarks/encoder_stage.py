"""In-encoder methods on the CPU reference model: time to first token, vision-encoder time and vision FLOPs.

Model: LLaVA-1.5 layout with random weights (``tokensieve.models.archs.build_arch("llava15-cpu")``: CLIP-L/14-336, 24
layers, 577 tokens, + a Qwen2-0.5B-sized LM), fp32, one image of 576 placeholders + 40 text tokens.

Two effects are kept apart so that speed-ups stay honest:

* ``skip``: HF runs all 24 CLIP layers although LLaVA reads ``hidden_states[-2]``; the in-encoder stage stops after
  the last layer it needs (output unchanged). Row ``none+skip`` is that alone (evoprune at the full budget: no cut,
  features identical to vanilla). Method rows marked ``no-skip`` run every layer, so their gain is pruning only.
* pruning: evocut (post-encoder reference), evoprune and flowcut at 192 / 128 / 64 tokens.

TTFT = wall time of ``generate(max_new_tokens=1)``. Vision time = the report's ``encode_s`` (tower + selection +
projector); for vanilla the same span is timed around ``get_image_features``. Vision FLOPs are analytic from the
report's per-layer token trace: per layer with T tokens, q/k/v/out projections ``8 T d^2``, MLP ``4 T d m``,
attention scores and weighted sum ``4 T^2 d`` (multiply-adds counted as 2); patch embedding and projector are left
out (they do not depend on the method's schedule). Configurations alternate within every repeat; the first round
is a warm-up and is dropped. Results: benchmarks/results/encoder_stage.{json,md}.

    python benchmarks/encoder_stage.py [--repeats 5] [--budgets 192,128,64] [--no-skip-budgets 64] [--threads 2]
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


def vision_flops(trace: list[int], d: int, m: int) -> float:
    return float(sum(8 * t * d * d + 4 * t * d * m + 4 * t * t * d for t in trace))


def configs(budgets: list[int], no_skip: list[int]) -> list[tuple[str, str | None, int, dict]]:
    """(label, method, budget, params); method None is the plain model."""
    out = [("none", None, 576, {}), ("none+skip", "evoprune", 576, {})]
    for k in budgets:
        out.append((f"evocut@{k}", "evocut", k, {}))
        for m in ("evoprune", "flowcut"):
            if k in no_skip:
                out.append((f"{m}@{k} no-skip", m, k, {"skip_unused_layers": False}))
            out.append((f"{m}@{k}", m, k, {}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--no-skip-budgets", default="64", help="budgets that also get a row without layer skipping")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_arch("llava15-cpu")
    batch = synthetic_inputs(model)
    vc = model.config.vision_config
    d, m = vc.hidden_size, vc.intermediate_size
    n_layers = vc.num_hidden_layers
    cfgs = configs([int(b) for b in args.budgets.split(",")], [int(b) for b in args.no_skip_budgets.split(",") if b])
    ttft = {c[0]: [] for c in cfgs}
    vision = {c[0]: [] for c in cfgs}
    traces: dict[str, list[int]] = {"none": [577] * n_layers}
    gen = dict(max_new_tokens=1, do_sample=False)
    with torch.inference_mode():
        model.generate(**batch, **gen)  # warm-up
        for rep in range(args.repeats + 1):
            for label, method, k, params in cfgs:
                if method is None:
                    t = time.perf_counter()
                    model.model.get_image_features(
                        pixel_values=batch["pixel_values"],
                        vision_feature_layer=-2,
                        vision_feature_select_strategy="default",
                    )
                    enc = time.perf_counter() - t
                    t = time.perf_counter()
                    model.generate(**batch, **gen)
                    elapsed = time.perf_counter() - t
                else:
                    sieve = Sieve(method, k, **params)
                    with sieve(model):
                        t = time.perf_counter()
                        model.generate(**batch, **gen)
                        elapsed = time.perf_counter() - t
                    enc = sieve.last_report.encode_s
                    traces[label] = list(sieve.last_report.encoder_layer_tokens)
                if rep:
                    ttft[label].append(elapsed)
                    vision[label].append(enc)
            print(
                f"repeat {rep}: " + ", ".join(f"{c[0]} {ttft[c[0]][-1]:.2f}s" for c in cfgs if ttft[c[0]]), flush=True
            )
    base, base_vis = statistics.median(ttft["none"]), statistics.median(vision["none"])
    base_flops = vision_flops(traces["none"], d, m)
    rows = []
    for label, method, k, params in cfgs:
        med, vis = statistics.median(ttft[label]), statistics.median(vision[label])
        fl = vision_flops(traces[label], d, m)
        rows.append(
            dict(
                config=label,
                method=method or "none",
                visual_tokens=k,
                skip_unused_layers=params.get("skip_unused_layers", method not in (None, "evocut")),
                ttft_s=med,
                min_s=min(ttft[label]),
                max_s=max(ttft[label]),
                speedup=base / med,
                vision_s=vis,
                vision_speedup=base_vis / vis,
                vision_gflops=fl / 1e9,
                vision_flops_ratio=fl / base_flops,
                encoder_layer_tokens=traces[label],
            )
        )
    meta = machine(args.threads, args.repeats, model="CLIP-L/14-336 + Qwen2-0.5B-sized LM, random weights, fp32")
    lines = [
        f"TTFT (generate, 1 new token) and vision encoder, fp32, {args.threads} threads, median of "
        f"{args.repeats}; vision GFLOPs analytic from the per-layer token trace (24 CLIP layers).",
        "",
        "| config | tokens | TTFT s (min-max) | TTFT speed-up | vision s | vision speed-up | vision GFLOPs (share) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['visual_tokens']} | {r['ttft_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) "
            f"| {r['speedup']:.2f}x | {r['vision_s']:.2f} | {r['vision_speedup']:.2f}x "
            f"| {r['vision_gflops']:.0f} ({100 * r['vision_flops_ratio']:.0f}%) |"
        )
    write(args.out, "encoder_stage", meta, rows, lines)


if __name__ == "__main__":
    main()
