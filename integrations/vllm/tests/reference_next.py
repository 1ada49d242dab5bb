"""A tiny random-weight LLaVA-NeXT saved for vLLM, and the ``Sieve`` path's outputs on it in transformers.

Runs in the *core* environment: ``python reference_next.py OUT_DIR``. Writes the model and its real processor to
``OUT_DIR/model`` (LM head size 32, which vLLM's CPU attention supports), the test images, and
``OUT_DIR/reference.json``: per case (method, budget, scope, newline policy), each image's kept patch ids, the
compressed prompt the LM received and the greedy answer tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "families"))

from builders import build_tiny_llava_next  # noqa: E402
from reference_common import NEXT_CASES as CASES  # noqa: E402
from reference_common import answer, case_id  # noqa: E402

from tokensieve import Sieve  # noqa: E402
from tokensieve.models.tiny import demo_image  # noqa: E402

MAX_NEW_TOKENS = 6
PROMPT = "user : <image> what is in the picture ? assistant :"


def images():
    """A wide (5 crops, unpadded rows), a tall (3 crops) and a square image (5 crops)."""
    return [demo_image(64, 0).resize((64, 40)), demo_image(64, 1).resize((30, 64)), demo_image(64, 2).resize((48, 48))]


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # LM heads of 32 for vLLM's CPU attention; a wider init so greedy answers depend on the image
    model, proc = build_tiny_llava_next(
        seed=1,
        text_overrides=dict(hidden_size=128, intermediate_size=256, initializer_range=0.2),
    )
    model.save_pretrained(out / "model")
    proc.save_pretrained(out / "model")
    cases, batches = [], []
    for i, image in enumerate(images()):
        image.save(out / f"image{i}.png")
        cases.append({"image": f"image{i}.png", "prompt": PROMPT})
        batches.append(proc(images=[image], text=[PROMPT], return_tensors="pt"))
    ref = {
        "cases": cases,
        "max_new_tokens": MAX_NEW_TOKENS,
        "vanilla": [answer(model, b, MAX_NEW_TOKENS) for b in batches],
        "sieve": {},
    }
    for method, budget, scope, newlines in CASES:
        ref["sieve"][case_id(method, budget, scope, newlines)] = [
            answer(model, b, MAX_NEW_TOKENS, Sieve(method, budget, scope=scope, newlines=newlines)) for b in batches
        ]
    (out / "reference.json").write_text(json.dumps(ref))


if __name__ == "__main__":
    main(sys.argv[1])
