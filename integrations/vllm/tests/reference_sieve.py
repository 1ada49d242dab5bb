"""Reference outputs of tokensieve's ``Sieve`` path in transformers, for the vLLM tests to compare against.

Runs in the *core* environment (transformers 5.23.0), not the vLLM one: ``python reference_sieve.py OUT_DIR``. Writes
the test images (the shapes test split), their prompts, and per method and budget each image's kept patch indices,
the compressed prompt the LM received and the greedy answer tokens, as ``OUT_DIR/reference.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from reference_common import answer

from tokensieve import Sieve
from tokensieve.data.shapes import dataset
from tokensieve.tools.evaluate import load_model, prompt_text

NUM_IMAGES = 3
MAX_NEW_TOKENS = 6
CASES = {  # method -> budgets (of 144 tokens per image on the default model)
    "evocut": [16, 72],
    "divprune": [16, 72],
    "fastervlm": [16, 72],
    "visionzip": [36],
    "pool": [36],
    "random": [36],
    "hiprune": [36],
    "vtc_cls": [36],
    "evoprune": [36],
    "flowcut": [36],
}


def run(model, processor, image, prompt, sieve=None) -> dict:
    return answer(model, processor(images=[image], text=[prompt], return_tensors="pt"), MAX_NEW_TOKENS, sieve)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load_model()
    cases = []
    for i, s in enumerate(dataset("test", limit=NUM_IMAGES)):
        s.image.save(out / f"image{i}.png")
        cases.append({"image": f"image{i}.png", "prompt": prompt_text(processor, s.question)})
    images = [s.image for s in dataset("test", limit=NUM_IMAGES)]
    ref = {
        "cases": cases,
        "max_new_tokens": MAX_NEW_TOKENS,
        "vanilla": [run(model, processor, im, c["prompt"]) for im, c in zip(images, cases)],
        "sieve": {},
    }
    for method, budgets in CASES.items():
        ref["sieve"][method] = {
            str(k): [run(model, processor, im, c["prompt"], Sieve(method, k)) for im, c in zip(images, cases)]
            for k in budgets
        }
    (out / "reference.json").write_text(json.dumps(ref))


if __name__ == "__main__":
    main(sys.argv[1])
