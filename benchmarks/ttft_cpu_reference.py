"""Time to first token on the CPU reference model: does compressing 576 -> k visual tokens pay off end to end?

Model: LLaVA-1.5 layout with random weights, CLIP-L/14-336 vision tower (24 layers, 577 tokens), MLP projector,
Qwen2-0.5B-sized LM (24 layers, width 896, 14 heads / 2 KV heads); fp32; a 576-placeholder prompt with 40 text
tokens. TTFT = wall time of ``generate(max_new_tokens=1)``, which includes vision, selection and prefill. Vanilla
and each method alternate within every repeat so that drift on a shared machine hits all of them alike.
Results: benchmarks/results/ttft_cpu_reference.{json,md}. A fuller harness (`tokensieve bench`) is planned.

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


def build(seed: int = 0):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=151646, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def inputs_for(model, text_tokens: int = 40):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(100, 1000, (text_tokens,), generator=g)
    img = torch.full((576,), model.config.image_token_id)
    ids = torch.cat([text[:5], img, text[5:]])[None]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(1, 3, 336, 336, generator=g))


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
    model = build()
    batch = inputs_for(model)
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
        rows.append(dict(method=name, visual_tokens=576 if name == "none" else args.budget, ttft_s=med,
                         min_s=min(times), max_s=max(times), speedup=base / med, selection_s=sel,
                         selection_share=sel / med))
    meta = machine(args.threads, args.repeats, model="CLIP-L/14-336 + Qwen2-0.5B-sized LM, random weights, fp32")
    lines = [f"TTFT (generate, 1 new token), fp32, {args.threads} threads, median of {args.repeats}.", "",
             "| method | visual tokens | TTFT s | min-max s | speed-up | selection ms (% of TTFT) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['visual_tokens']} | {r['ttft_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} "
                     f"| {r['speedup']:.2f}x | {1e3 * r['selection_s']:.1f} ({100 * r['selection_share']:.2f}%) |")
    write(args.out, "ttft_cpu_reference", meta, rows, lines)


if __name__ == "__main__":
    main()
