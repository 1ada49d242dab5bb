"""What the reference scripts share: one greedy answer, plain or under a ``Sieve`` (core environment), and the
LLaVA-NeXT case list, which the vLLM tests read too (torch only at import)."""

from __future__ import annotations

import torch

NEXT_CASES = [  # (method, budget, scope, newlines); 16 patches per crop, images of 5, 3 and 5 crops
    ("evocut", 20, "image", "all"),
    ("evocut", 2, "crop", "all"),
    ("divprune", 20, "image", "all"),
    ("divprune", 12, "global", "all"),
    ("fastervlm", 20, "image", "all"),
    ("fastervlm", 0.25, "image", "none"),
    ("visionzip", 20, "image", "all"),
    ("pool", 4, "crop", "all"),
    ("random", 20, "image", "none"),
    ("hiprune", 20, "image", "all"),
    ("vtc_cls", 20, "image", "all"),
]


def case_id(method, budget, scope, newlines) -> str:
    """The key of one LLaVA-NeXT case in the reference."""
    return f"{method}-{budget}-{scope}-{newlines}"


def answer(model, batch: dict, max_new_tokens: int, sieve=None) -> dict:
    """Greedy answer of one prompt: the prompt ids the LM received (compressed under a sieve), the answer tokens,
    and under a sieve the first image's kept indices."""
    with torch.inference_mode():
        if sieve is None:
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            return {"ids": batch["input_ids"][0].tolist(), "tokens": out[0, batch["input_ids"].shape[1] :].tolist()}
        with sieve(model):
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    report = sieve.last_report
    return {
        "ids": report.input_ids[0].tolist(),
        "kept": report.images[0].kept_indices,
        "tokens": out[0, batch["input_ids"].shape[1] :].tolist(),
    }
