"""Host syncs a sieved ``generate()`` adds over the same call without a sieve, per method, at batch 1, 8 and 32.

    python benchmarks/host_syncs.py --out benchmarks/results/host_syncs

Each host read (``.item()``, ``.tolist()``, ``int(t)``, a boolean test on a tensor, ``nonzero()``) stalls a GPU
until its queue drains; counted on the CPU the same way (``tokensieve.tools.syncs``: ``aten::_local_scalar_dense``
and ``aten::nonzero`` from ``torch.profiler``, plus ``Tensor.tolist`` / ``numpy``). The tiny 4-layer LLaVA (a 8x8
grid of 64 visual tokens), left-padded prompts of different lengths, one new token; pre-LLM methods at 16 tokens,
in-LLM ones at 40 layer-averaged. ``--before FILE`` adds a column from an earlier run's JSON (the committed one was
made with this counter at commit 205a3aa, before the hot path was reworked).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tokensieve import Sieve
from tokensieve.models.tiny import build_tiny_llava, demo_image
from tokensieve.tools.syncs import counting

CONFIGS = [
    ("evocut", 16, {}),
    ("divprune", 16, {}),
    ("fastervlm", 16, {}),
    ("vispruner", 16, {}),
    ("visionzip", 16, {}),
    ("hiprune", 16, {}),
    ("evoprune", 16, {}),
    ("flowcut", 16, {}),
    ("todre", 16, {}),
    ("fastv", 40, {"layer": 1}),
    ("pdrop", 40, {}),
    ("dart", 40, {"layer": 1}),
]
BATCHES = (1, 8, 32)


def measure() -> dict[str, dict[str, int]]:
    torch.set_num_threads(1)
    model, processor = build_tiny_llava(image_size=32, patch_size=4, vision_layers=6, text_layers=4)
    processor.tokenizer.padding_side = "left"

    def batch(n):
        def chat(s):
            return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?" + " the" * s}]}]

        texts = [processor.apply_chat_template(chat(s % 5), add_generation_prompt=True) for s in range(n)]
        images = [demo_image(size=96, seed=s % 3) for s in range(n)]
        return processor(images=images, text=texts, return_tensors="pt", padding=True)

    def count(b, sieve):
        def call():
            with torch.inference_mode():
                if sieve is None:
                    model.generate(**b, max_new_tokens=1, do_sample=False)
                    return
                with sieve(model):
                    model.generate(**b, max_new_tokens=1, do_sample=False)

        call()
        with counting() as n:
            call()
        return n()

    out: dict[str, dict[str, int]] = {}
    for n in BATCHES:
        b = batch(n)
        vanilla = count(b, None)
        for name, k, params in CONFIGS:
            out.setdefault(name, {})[str(n)] = count(b, Sieve(name, k, **params)) - vanilla
        print(f"batch {n}: " + ", ".join(f"{m} +{out[m][str(n)]}" for m in out), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/host_syncs")
    p.add_argument("--before", default=None, help="an earlier run's host_syncs.json, shown beside this one")
    args = p.parse_args(argv)
    after = measure()
    before = json.loads(Path(args.before).read_text())["after"] if args.before else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_syncs.json").write_text(json.dumps({"after": after, "before": before}, indent=2))
    head = " | ".join(f"batch {n}" for n in BATCHES)
    lines = [f"| method | {head} |", "|---|" + "---:|" * len(BATCHES)]
    for name in after:
        cells = [
            (f"{before[name][str(n)]} -> " if before and name in before else "") + str(after[name][str(n)])
            for n in BATCHES
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "host_syncs.md").write_text(
        "Host syncs one `generate()` adds over the same call without a sieve (`python benchmarks/host_syncs.py`)"
        + (", before -> after" if before else "")
        + ".\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(f"wrote {out / 'host_syncs.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
