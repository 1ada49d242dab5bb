"""Cost of each selector at LLaVA-1.5-7B size, against the CLIP-L/14-336 encoder it runs after.

Selectors see exactly the shapes a real LLaVA-1.5 gives them (576 patches, 24 layers of width 1024, 16 heads,
LM width 4096 for post-projector methods); the encoder is a random-weight CLIPVisionModel of the real size, timed
for scale. Results: benchmarks/results/selection_cost.{json,md}.

    python benchmarks/selection_cost.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _results import machine, write

from tokensieve.methods import get_method, method_names
from tokensieve.methods.base import POST_PROJECTOR, Layout, Signals

GRID, LAYERS, WIDTH, HEADS, LM_WIDTH = (24, 24), 24, 1024, 16, 4096
N = GRID[0] * GRID[1]


def signals_for(method, gen: torch.Generator) -> Signals:
    fl = LAYERS - 1  # hidden_states[-2]
    req = method.request(LAYERS, fl)
    width = LM_WIDTH if method.stage == POST_PROJECTOR else WIDTH
    attn = torch.randn(1, HEADS, N, generator=gen).softmax(-1)
    return Signals(
        features=torch.randn(1, N, width, generator=gen),
        layout=Layout(GRID),
        num_layers=LAYERS,
        feature_layer=fl,
        hidden_states={i: torch.randn(1, N, WIDTH, generator=gen) for i in req.hidden_states},
        cls_attention={i: attn for i in req.cls_attention},
        keys={i: torch.randn(1, HEADS, N, WIDTH // HEADS, generator=gen) for i in req.keys},
        cls_hidden=torch.randn(1, WIDTH, generator=gen) if req.cls_hidden else None,
    )


def median_ms(fn, repeats: int) -> tuple[float, float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def encoder_ms(repeats: int) -> float:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    model = CLIPVisionModel(cfg).eval()
    pv = torch.randn(1, 3, 336, 336)
    with torch.inference_mode():
        return median_ms(lambda: model(pv), repeats)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    gen = torch.Generator().manual_seed(0)
    enc = encoder_ms(max(3, args.repeats // 2))
    rows = []
    for name in method_names():
        method = get_method(name)()
        sig = signals_for(method, gen)
        for k in budgets:
            with torch.inference_mode():
                med, lo, hi = median_ms(lambda: method.select(sig, k).output(sig.features), args.repeats)  # noqa: B023 (timed within this iteration)
            rows.append(dict(method=name, budget=k, median_ms=med, min_ms=lo, max_ms=hi, share_of_encoder=med / enc))
    meta = machine(
        args.threads, args.repeats, encoder="CLIP-L/14-336 random weights, fp32, batch 1", encoder_median_ms=enc
    )
    lines = [
        f"Selection cost per image, fp32, {args.threads} threads; CLIP-L/14-336 encoder forward: "
        f"{enc:.0f} ms (median of {max(3, args.repeats // 2)}).",
        "",
        "| method | budget | median ms | min-max ms | % of encoder |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} "
            f"| {100 * r['share_of_encoder']:.2f}% |"
        )
    write(args.out, "selection_cost", meta, rows, lines)


if __name__ == "__main__":
    main()
