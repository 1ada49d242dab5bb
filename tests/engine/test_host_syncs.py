"""Host syncs a sieved call adds over the same call without a sieve, per method, at batch 1 and 8.

On a GPU each host read stalls the device queue, so the count must not grow with the batch, and decoding steps
must add none. The recorded numbers are the most a method may add (``docs/benchmarks.md`` has the table with the
counts before this work); a change that adds a read fails here. Counted on the CPU with :mod:`.syncs`.
"""

from __future__ import annotations

import pytest
import torch

from tokensieve import Sieve
from tokensieve.models.tiny import build_tiny_llava, demo_image
from tokensieve.tools.syncs import counting

from ..conftest import prompt

ADDED = {
    # method, budget, parameters: the most syncs a call may add at batch 1 and 8. The pre-LLM path reads the
    # prompt's layout once, checks the features are finite once, reads the kept indices for the report once.
    "evocut": (16, {}, 3, 3),
    "divprune": (16, {}, 3, 3),
    "fastervlm": (16, {}, 3, 3),
    "vispruner": (16, {}, 3, 3),
    "visionzip": (16, {}, 4, 4),  # + one boolean index in its contextual merge
    "pool": (16, {}, 3, 3),
    "random": (16, {}, 3, 3),
    "vtc_cls": (16, {}, 3, 3),
    "hiprune": (16, {}, 3, 3),
    "evoprune": (16, {}, 4, 4),  # + one read of every cut's checks
    "flowcut": (16, {}, 5, 12),  # its cut count is entropy-adaptive per image: one read per image and cut
    "todre": (16, {}, 4, 4),  # + its in-LLM rule's yes/no for the whole batch
    "fastv": (40, {"layer": 1}, 3, 3),  # in-LLM: boundaries add nothing (counts are known on the host)
    "pdrop": (40, {}, 3, 3),
    "dart": (40, {"layer": 1}, 4, 4),  # + one read of every image's pivots (its walk order is a Python set)
}
PRE_LLM_GOAL = 4
"""The goal: a pre-LLM method adds at most 4 syncs to a call, whatever the batch (FlowCut excepted, above), and an
in-LLM stage at most 4 per boundary on top."""


@pytest.fixture(scope="module")
def deep():
    model, processor = build_tiny_llava(image_size=32, patch_size=4, vision_layers=6, text_layers=4)
    processor.tokenizer.padding_side = "left"
    return model, processor


def _batch(processor, n):
    images = [demo_image(size=96, seed=s) for s in range(n)]
    texts = [prompt(processor, "what is in the picture ?" + " the" * s) for s in range(n)]  # padded: lengths differ
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def _count(model, batch, sieve, new_tokens=1):
    def call():
        with torch.inference_mode():
            if sieve is None:
                return model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
            with sieve(model):
                return model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)

    call()  # warm: first calls build caches and install transformers' own hooks
    with counting() as count:
        call()
    return count()


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("name", sorted(ADDED))
def test_a_call_adds_no_more_host_syncs_than_recorded(deep, name, n):
    model, processor = deep
    batch = _batch(processor, n)
    budget, params, at_1, at_8 = ADDED[name]
    added = _count(model, batch, Sieve(name, budget, **params)) - _count(model, batch, None)
    assert added <= (at_1 if n == 1 else at_8), f"{name} at batch {n} adds {added} host syncs"
    if name != "flowcut":
        llm = Sieve(name, budget, **params).llm_method
        boundaries = len(llm.schedule(64, 4, None if not llm.budgeted else 40)) if llm is not None else 0
        assert added <= PRE_LLM_GOAL + 4 * boundaries


@pytest.mark.parametrize("name", ["evocut", "fastv", "pdrop", "dart"])
def test_decoding_steps_add_no_host_sync(deep, name):
    model, processor = deep
    batch = _batch(processor, 2)
    budget, params, _, _ = ADDED[name]
    sieve = Sieve(name, budget, **params)
    sieved = _count(model, batch, sieve, 4) - _count(model, batch, sieve, 1)
    vanilla = _count(model, batch, None, 4) - _count(model, batch, None, 1)
    assert sieved == vanilla
