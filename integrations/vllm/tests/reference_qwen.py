"""A tiny random-weight Qwen2.5-VL saved for vLLM, and the ``Sieve`` path's outputs on it in transformers.

Runs in the *core* environment: ``python reference_qwen.py OUT_DIR``. Writes the model to ``OUT_DIR/model`` (LM head
size 32, which vLLM's CPU attention supports; the tokenizer with its special tokens registered, so vLLM's processor
splits them; the image processor config), the test images, and ``OUT_DIR/reference.json``: per method and budget,
each image's kept merge units, the compressed prompt the LM received and the greedy answer tokens.

The HF processor of Qwen2.5-VL cannot be built without torchvision (neither here nor in vLLM's environment), so
the prompt is made the way it does: the tokenizer on the text, then each ``<|image_pad|>`` repeated
``grid.prod() // 4`` times, pixels from the saved image processor (the PIL one, as vLLM's image-only processor).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "families"))

from builders import MERGE, PATCH, QWEN_SPECIALS, build_tiny_qwen  # noqa: E402
from reference_common import answer  # noqa: E402

from tokensieve import Sieve  # noqa: E402
from tokensieve.data.shapes import dataset  # noqa: E402

MAX_NEW_TOKENS = 6
MAX_PIXELS = 96 * 96
CASES = {  # method -> budgets; the smallest image has 18 units (a 48x96 crop), the square ones 36
    "evocut": [4, 12],
    "divprune": [4, 12],
    "fastervlm": [4, 12],
    "visionzip": [9],
    "pool": [9],
    "random": [9],
    "hiprune": [9],
    "vtc_cls": [9],
}
PROMPT = "<s> user : <|vision_start|><|image_pad|><|vision_end|> {q} assistant :"


def build(out: Path):
    # LM heads of 32 (hidden 128 / 4 heads) for vLLM's CPU attention; a wider init so greedy answers depend on the
    # image (the default 0.02 gives near-uniform logits and the same token for every image)
    model, proc = build_tiny_qwen(
        "qwen2_5_vl",
        seed=3,
        text_overrides=dict(
            hidden_size=128,
            intermediate_size=256,
            initializer_range=0.2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        ),
        vision_overrides=dict(out_hidden_size=128),
    )
    tok = proc.tokenizer
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[4:]})
    image_processor = type(proc.image_processor)(  # the tiny family's settings, up to 96x96 px (36 units)
        min_pixels=(2 * PATCH * MERGE) ** 2,
        max_pixels=MAX_PIXELS,
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=2,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    return model, tok, image_processor


def images():
    """A square image, a wide and a tall crop: 36, 18 and 18 merge units (h != w checks the M-RoPE extent)."""
    scenes = [s for s in dataset("test", limit=3)]
    return [
        (scenes[0].image, scenes[0].question),
        (scenes[1].image.crop((0, 24, 96, 72)), scenes[1].question),
        (scenes[2].image.crop((24, 0, 72, 96)), scenes[2].question),
    ]


def inputs(tok, image_processor, image, question) -> dict:
    pix = image_processor(images=[image], return_tensors="pt")
    n = int(pix["image_grid_thw"][0].prod()) // 4
    ids = tok(PROMPT.format(q=question), add_special_tokens=False)["input_ids"]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    at = ids.index(pad)
    ids = ids[:at] + [pad] * n + ids[at + 1 :]
    input_ids = torch.tensor([ids])
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=(input_ids == pad).long(),
        **pix,
    )


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, image_processor = build(out / "model")
    cases, batches = [], []
    for i, (image, question) in enumerate(images()):
        image.save(out / f"image{i}.png")
        cases.append({"image": f"image{i}.png", "prompt": PROMPT.format(q=question)})
        batches.append(inputs(tok, image_processor, image, question))
    ref = {
        "cases": cases,
        "max_new_tokens": MAX_NEW_TOKENS,
        "vanilla": [answer(model, b, MAX_NEW_TOKENS) for b in batches],
        "sieve": {},
    }
    for method, budgets in CASES.items():
        ref["sieve"][method] = {
            str(k): [answer(model, b, MAX_NEW_TOKENS, Sieve(method, k)) for b in batches] for k in budgets
        }
    (out / "reference.json").write_text(json.dumps(ref))


if __name__ == "__main__":
    main(sys.argv[1])
