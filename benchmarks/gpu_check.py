"""The GPU check: does the speed-up hold where users run it? One command, at most a few minutes on one GPU.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu
    python benchmarks/gpu_check.py --arch tiny --device cpu --out out/gpu_check_tiny     # the test suite's run

LLaVA-1.5-7B's shapes (``--arch llava15-7b``: CLIP-L/14-336 + Vicuna-7B) with random fp16 weights on SDPA (timing
depends on shapes, not on weight values), batch 1 and 16, one image of 576 visual tokens and 40 text tokens per
sample: the full-token model against EvoCut, DivPrune, FasterVLM, VisPruner and EvoPrune at 64 of 576 tokens, and
FastV and PDrop at 64 layer-averaged tokens. Per configuration: time to first token and decode ms per token from
CUDA events (``tokensieve.tools.measure``), selection time, peak CUDA memory, the KV cache, and the host syncs one
call makes (``tokensieve.tools.syncs``). Writes ``gpu_check.md`` and ``gpu_check.json`` naming the device.

Needs only torch, transformers and tokensieve. Budgets scale with the architecture's token count (64 of 576 is 16
of the tiny model's 144), so the same command checks the plumbing on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tokensieve import Sieve
from tokensieve.models.archs import arch_config, build_arch, synthetic_inputs
from tokensieve.tools.measure import measure_call
from tokensieve.tools.syncs import counting

CONFIGS = [
    ("none", {}),
    ("evocut", {}),
    ("divprune", {}),
    ("fastervlm", {}),
    ("vispruner", {}),
    ("evoprune", {}),
    ("fastv", {}),
    ("pdrop", {}),
]
"""Method and parameters; every one at the same budget (64 of 576 tokens, scaled to the architecture)."""


def batch_of(one: dict, n: int) -> dict:
    """``n`` copies of a one-sample batch (the same image and prompt: timing depends on shapes only)."""
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in one.items()}


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = arch_config(args.arch)
    vc = config.vision_config
    tokens = (vc.image_size // vc.patch_size) ** 2
    budget = max(1, round(args.budget * tokens / 576))
    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else previous)  # no fp32 copy of 7B on the way
    try:
        model = build_arch(args.arch, dtype=dtype, device=device)
    finally:
        torch.set_default_dtype(previous)
    one = synthetic_inputs(model, text_tokens=args.text_tokens)
    built_s = time.perf_counter() - started
    rows = []
    for n in args.batches:
        batch = batch_of(one, n)
        for name, params in CONFIGS:
            k = budget
            if name in ("fastv", "pdrop") and config.get_text_config().num_hidden_layers < 8:
                # a 4-layer LM cannot average 16 of 144 tokens: the plumbing check runs in-LLM methods at half
                k, params = tokens // 2, ({"layer": 1} if name == "fastv" else params)
            sieve = None if name == "none" else Sieve(name, k, **params)
            for _ in range(args.warmup):
                measure_call(model, batch, sieve, new_tokens=args.new_tokens)
            timings = [measure_call(model, batch, sieve, new_tokens=args.new_tokens)[0] for _ in range(args.repeats)]
            with counting() as syncs:
                measure_call(model, batch, sieve, new_tokens=args.new_tokens)
            row = {
                "batch": n,
                "method": name,
                "budget": None if sieve is None else k,
                "ttft_ms": statistics.median(t.ttft_s for t in timings) * 1e3,
                "ttft_ms_range": [min(t.ttft_s for t in timings) * 1e3, max(t.ttft_s for t in timings) * 1e3],
                "decode_ms_per_token": statistics.median(t.decode_ms_per_token or 0.0 for t in timings),
                "selection_ms": statistics.median(t.selection_s for t in timings) * 1e3,
                "peak_memory_mib": statistics.median((t.peak_memory_bytes or 0) for t in timings) / 2**20,
                "kv_cache_mib": timings[0].kv_cache_bytes / 2**20,
                "host_syncs": syncs(),
            }
            rows.append(row)
            print(
                f"batch {n:2d} {name:10s} TTFT {row['ttft_ms']:8.2f} ms  decode {row['decode_ms_per_token']:6.2f} "
                f"ms/token  selection {row['selection_ms']:6.2f} ms  syncs {row['host_syncs']}",
                flush=True,
            )
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["method"] == "none")
        row["ttft_speedup"] = base["ttft_ms"] / row["ttft_ms"] if row["ttft_ms"] else None
        row["syncs_added"] = row["host_syncs"] - base["host_syncs"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "meta": {
            "device": name,
            "arch": args.arch,
            "dtype": args.dtype,
            "visual_tokens": tokens,
            "budget": budget,
            "text_tokens": args.text_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "build_s": built_s,
            "total_s": time.perf_counter() - started,
            "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        },
        "rows": rows,
    }


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"# GPU check: {m['arch']} ({m['dtype']}) on {m['device']}",
        "",
        f"{m['visual_tokens']} visual + {m['text_tokens']} text tokens per sample; methods at {m['budget']} tokens "
        f"(in-LLM: layer-averaged); {m['new_tokens']} new tokens, median of {m['repeats']} after {m['warmup']} "
        f"warm-up call(s); torch {m['torch']}, CUDA {m['cuda']}. `{m['command']}` ({m['total_s']:.0f} s).",
        "",
        "| batch | method | tokens | TTFT ms (min-max) | speed-up | decode ms/token | selection ms | peak MiB "
        "| KV MiB | host syncs (added) |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lo, hi = r["ttft_ms_range"]
        lines.append(
            f"| {r['batch']} | {r['method']} | {r['budget'] or m['visual_tokens']} "
            f"| {r['ttft_ms']:.2f} ({lo:.2f}-{hi:.2f}) "
            f"| {r['ttft_speedup']:.2f}x | "
            f"{r['decode_ms_per_token']:.2f} | {r['selection_ms']:.2f} | {r['peak_memory_mib']:.0f} | "
            f"{r['kv_cache_mib']:.1f} | {r['host_syncs']} ({r['syncs_added']:+d}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llava15-7b", help="an architecture of tokensieve.models.archs")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    p.add_argument("--budget", type=int, default=64, help="tokens kept of 576 (scaled to the architecture)")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="out/gpu_check", help="folder for gpu_check.md and gpu_check.json")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_check: --device {args.device}, but this torch ({torch.__version__}) has no usable CUDA device; "
            "run it on a GPU machine, or --arch tiny --device cpu to check the plumbing",
            file=sys.stderr,
        )
        return 2
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text(markdown(result))
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
