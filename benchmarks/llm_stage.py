"""In-LLM methods on the CPU reference model: prefill time and LM FLOPs at layer-averaged budgets of 192/128/64.

Model: LLaVA-1.5 layout with random weights (CLIP-L/14-336 + a Qwen2-0.5B-sized LM, 24 decoder layers), fp32,
576 visual + 40 text tokens. For each method and budget, ``generate(max_new_tokens=1)`` runs once per repeat;
methods alternate within a repeat so drift on a shared machine hits all of them alike, and the fastest repeat of
each is reported next to the median (other jobs on the machine slow single runs by up to 4x).

- prefill s: wall time of the language model's forward inside that call (in-LLM selection included, vision
  excluded); TTFT s: the whole call.
- LM GFLOPs: from the report's per-layer token counts (``llm_layer_tokens``), per layer
  ``2*n*(2*d*d_q + 2*d*d_kv) + 4*n^2*d_q + 6*n*d*m`` (projections, QK^T and AV counted as full n x n as SDPA
  computes them, SwiGLU MLP), summed over layers; LM head and the selection's own work excluded.
- budgets: in-LLM methods (fastv, pdrop, dart) take the layer-averaged visual tokens; evocut and todre take the
  tokens entering the LM (todre's stage 2 then acts by its threshold, and its layer average is what it is).
  The table shows both numbers for every row.

    python benchmarks/llm_stage.py [--budgets 192,128,64] [--repeats 3] [--tiny]
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

METHODS = ("evocut", "fastv", "pdrop", "dart", "todre")


def lm_flops(config, layer_tokens: list[int]) -> float:
    tc = config.get_text_config()
    d, m = tc.hidden_size, tc.intermediate_size
    hd = getattr(tc, "head_dim", None) or d // tc.num_attention_heads
    dq, dkv = tc.num_attention_heads * hd, tc.num_key_value_heads * hd
    return float(sum(2 * n * (2 * d * dq + 2 * d * dkv) + 4 * n * n * dq + 6 * n * d * m for n in layer_tokens))


class LMTimer:
    """Times the language model's forward calls (prefill is the first one of a generate())."""

    def __init__(self, lm) -> None:
        self.times: list[float] = []
        self._h = [lm.register_forward_pre_hook(self._start), lm.register_forward_hook(self._stop)]

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.times.append(time.perf_counter() - self._t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="smoke-test the script on the tiny model")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    t0 = time.perf_counter()
    if args.tiny:
        from tokensieve.models.tiny import build_tiny_llava, demo_image

        model, processor = build_tiny_llava(image_size=64, patch_size=4, text_layers=24)
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture ?"}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        batch = dict(processor(images=[demo_image(96)], text=[text], return_tensors="pt"))
        budgets = [b * 256 // 576 for b in budgets]  # same shares of a 16 x 16 grid
    else:
        model = build_arch("llava15-cpu")
        batch = synthetic_inputs(model)
    print(f"built model in {time.perf_counter() - t0:.0f} s")
    timer = LMTimer(model.get_decoder())
    configs = [("none", None)] + [(m, b) for b in budgets for m in args.methods.split(",")]
    if not args.tiny:
        configs.append(("evocut+fastv", [192, 128]))
    runs = {c[0] + ("" if c[1] is None else f"@{c[1]}"): dict(ttft=[], prefill=[], report=None, cfg=c) for c in configs}
    gen = dict(max_new_tokens=1, do_sample=False)
    with torch.inference_mode():
        model.generate(**batch, **gen)  # warm-up
        for rep in range(args.repeats + 1):  # the first round warms each method up and is dropped
            for run in runs.values():
                name, budget = run["cfg"]
                timer.times.clear()
                if name == "none":
                    t = time.perf_counter()
                    model.generate(**batch, **gen)
                    elapsed = time.perf_counter() - t
                    report = None
                else:
                    sieve = Sieve(name.split("+"), budget) if "+" in name else Sieve(name, budget)
                    with sieve(model):
                        t = time.perf_counter()
                        model.generate(**batch, **gen)
                        elapsed = time.perf_counter() - t
                    report = sieve.last_report
                if rep:
                    run["ttft"].append(elapsed)
                    run["prefill"].append(timer.times[0])
                    run["report"] = report
            print(
                f"repeat {rep}: " + ", ".join(f"{k} {v['prefill'][-1]:.2f}s" for k, v in runs.items() if v["prefill"])
            )
    n_layers = model.config.get_text_config().num_hidden_layers
    seq = int(batch["input_ids"].shape[1])
    n_vis = int((batch["input_ids"] == model.config.image_token_id).sum())
    base_flops = lm_flops(model.config, [seq] * n_layers)
    # other jobs share this machine: the fastest repeat is the one least disturbed, so speed-ups use minima
    base_prefill = min(runs["none"]["prefill"])
    rows = []
    for run in runs.values():
        rep = run["report"]
        tokens = rep.llm_layer_tokens[0] if rep is not None else [seq] * n_layers
        visual = rep.llm_layer_visual_tokens[0] if rep is not None else [n_vis] * n_layers
        flops = lm_flops(model.config, tokens)
        pre = statistics.median(run["prefill"])
        rows.append(
            dict(
                method=run["cfg"][0],
                budget=run["cfg"][1],
                entering=visual[0],
                layer_avg=sum(visual) / n_layers,
                visual_per_layer=visual,
                prefill_s=pre,
                prefill_min=min(run["prefill"]),
                prefill_max=max(run["prefill"]),
                ttft_s=statistics.median(run["ttft"]),
                ttft_min=min(run["ttft"]),
                lm_gflops=flops / 1e9,
                flops_share=flops / base_flops,
                prefill_speedup=base_prefill / min(run["prefill"]),
                selection_s=rep.selection_s if rep is not None else 0.0,
            )
        )
    meta = machine(
        args.threads,
        args.repeats,
        model="tiny" if args.tiny else "CLIP-L/14-336 + Qwen2-0.5B-sized LM (24 layers), random weights, fp32",
        prompt_tokens=seq,
        visual_tokens=n_vis,
        decoder_layers=n_layers,
    )
    lines = [
        f"LM prefill inside generate(max_new_tokens=1), fp32, {args.threads} threads, {args.repeats} repeats; "
        f"{seq} prompt tokens of which {n_vis} visual; {n_layers} decoder layers. Prefill: fastest repeat "
        "(median, max); speed-up between fastest repeats; TTFT: fastest repeat.",
        "",
        "| method | budget | visual tokens entering LM | layer-averaged visual | prefill s min (median, max) "
        "| prefill speed-up | LM GFLOPs (share) | TTFT s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget'] if r['budget'] is not None else '-'} | {r['entering']} "
            f"| {r['layer_avg']:.1f} "
            f"| {r['prefill_min']:.2f} ({r['prefill_s']:.2f}, {r['prefill_max']:.2f}) | {r['prefill_speedup']:.2f}x "
            f"| {r['lm_gflops']:.1f} ({100 * r['flops_share']:.0f}%) | {r['ttft_min']:.2f} |"
        )
    write(args.out, "llm_stage" + ("_tiny" if args.tiny else ""), meta, rows, lines)


if __name__ == "__main__":
    main()
