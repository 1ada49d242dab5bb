"""Conformance, counts: an int budget counts per image, crop, frame or whole image / video as its scope says, at
every stage; ratios are layer-averaged per entry in the LM; a budget beyond the tokens is a clear error."""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.errors import BudgetError
from tokensieve.methods import get_method
from tokensieve.methods.base import IN_ENCODER, LLMMethod

from .conformance import FAMILIES, NAMES, generate, image_sets, layer_hooks, logits


class KeepTarget(LLMMethod):
    """Keeps exactly the resolved target of each entry after layer 1, so a test reads what a budget resolved to."""

    name = "keep-target"
    description = "test helper"

    def schedule(self, n, num_layers, target):
        return [(1, target)]

    def select_llm(self, signals, ks):
        return [torch.arange(k) for k in ks]


def _params():
    return [
        pytest.param(name, method, scope, id=f"{name}-{method}-{scope}")
        for name, family in FAMILIES.items()
        for method in ["divprune", "evoprune", "keep-target"]
        for scope in family.scopes
    ]


def _k(family, scope):
    """2 per candidate set; 8 where one count is spread over an image's crops or a whole video."""
    return 8 if scope == "global" or (scope == "image" and family.crops_share_budget) else 2


def _expected(family, entries, scope, k):
    """Tokens a candidate set (one image or video; the crops of one image where they share) keeps in total."""
    if entries[0].frames:  # a video: k per frame unless global
        return k if scope == "global" else k * entries[0].frames
    if family.crops_share_budget:  # entries are crops: k each at scope crop, else k shared over the image
        return k * len(entries) if scope == "crop" else k
    return k * entries[0].crops if scope == "crop" else k


@pytest.mark.parametrize("fam,method,scope", _params(), indirect=["fam"])
def test_int_budgets_count_by_scope(fam, method, scope):
    """Per image by default (shared over an image's crops where crops are entries), per crop with ``crop``, per
    frame for videos unless ``global`` (one count per whole image or video); before the projector, in the encoder
    (which refuses ``global`` where it sees one crop or frame at a time) and in the LM alike."""
    family, model, inputs = fam.family, fam.model, fam.make(1)
    k = _k(family, scope)
    in_llm = method == "keep-target"
    sieve = Sieve(KeepTarget() if in_llm else method, k, scope=scope)
    in_encoder = not in_llm and get_method(method).stage == IN_ENCODER
    if scope == "global" and in_encoder and not family.in_encoder_global:
        with pytest.raises(BudgetError, match="global"):
            with sieve(model):
                logits(model, inputs)
        assert layer_hooks(model) == 0
        return
    with sieve(model):
        logits(model, inputs)
    images = sieve.last_report.images
    assert any(im.frames for im in images) == family.videos
    if scope == "crop" and not family.crops_share_budget:  # anyres images span several crops, LLaVA-1.5's one
        assert any(im.crops > 1 for im in images if not im.frames) == (fam.name != "llava15")
    for entries in image_sets(fam, inputs, images):
        counts = [im.llm_layer_tokens[-1] if in_llm else len(im.kept_indices) for im in entries]
        want = _expected(family, entries, scope, k)
        if in_encoder and entries[0].crops > 1 and not family.crops_share_budget:
            # the encoder sees whole crops: a kept patch that anyres unpadding removes is dropped
            assert 0 < sum(counts) <= want
        else:
            assert sum(counts) == want, (scope, counts)
        if family.crops_share_budget and scope == "image":  # shared out evenly, the remainder to the first crops
            n = len(entries)
            assert counts == [k // n + (1 if j < k % n else 0) for j in range(n)]
        if family.crops_share_budget and scope == "crop":
            assert counts == [k] * len(entries)


@pytest.mark.parametrize("fam", NAMES, indirect=True)
def test_ratio_budget_is_layer_averaged_per_entry(fam):
    sieve = Sieve("fastv", 0.6, layer=1)
    with sieve(fam.model):
        generate(fam.model, fam.make(1), n=1)
    for im in sieve.last_report.images:
        # the ratio resolves to a whole target, which a one-boundary plan meets up to rounding its kept count
        assert abs(im.llm_tokens_avg - round(0.6 * im.tokens_out)) <= 0.5


@pytest.mark.parametrize("fam", NAMES, indirect=True)
def test_budget_beyond_the_tokens_is_a_clear_error(fam):
    with pytest.raises(BudgetError, match="exceeds"):  # at apply() where every image has one count, else at the call
        with Sieve("fastv", 100000, layer=1)(fam.model):
            generate(fam.model, fam.make(0), n=1)
    assert layer_hooks(fam.model) == 0
