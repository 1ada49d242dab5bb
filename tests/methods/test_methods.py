"""Selectors on hand-made tensors: the contract every method keeps (registry, shapes, order, batch independence,
budget range) and the shared top-k tie rule."""

from __future__ import annotations

import pytest
import torch

from tokensieve.methods import IN_LLM, get_method, method_names
from tokensieve.methods.base import IN_ENCODER, POST_PROJECTOR, PRE_PROJECTOR

from .signals import PRE, SELECTORS, B, D, N, image, make_signals, run

# ----------------------------------------------------------------------------------------------------- contract


def test_registry_lists_every_method():
    assert method_names() == sorted(
        [
            "evocut",
            "divprune",
            "visionzip",
            "fastervlm",
            "vispruner",
            "pool",
            "random",
            "evoprune",
            "flowcut",
            "hiprune",
            "vtc_cls",
            "todre",
            "fastv",
            "pdrop",
            "dart",
        ]
    )
    assert PRE == sorted(
        ["evocut", "divprune", "visionzip", "fastervlm", "vispruner", "pool", "random", "todre", "hiprune", "vtc_cls"]
    )
    for name in method_names():
        cls = get_method(name)
        assert cls.name == name
        assert cls.stage in (PRE_PROJECTOR, POST_PROJECTOR, IN_ENCODER, IN_LLM)
        assert isinstance(cls.description, str) and "\n" not in cls.description and cls.description
        assert isinstance(cls.signals, tuple)
    assert get_method("divprune").stage == POST_PROJECTOR


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("k", [1, 7, N])
def test_contract(name, k):
    signals = make_signals()
    if name == "pool" and k == 7:  # 7 = 1 x 7 cannot fit a 6 x 6 grid
        with pytest.raises(ValueError):
            run(name, signals, k)
        return
    sel = run(name, signals, k)
    idx = sel.indices
    assert idx.dtype == torch.int64 and idx.dim() == 2 and idx.shape[0] == B
    assert sel.num_out == k
    out = sel.output(signals.features)
    assert out.shape == (B, k, D)
    assert out.dtype == signals.features.dtype
    if idx.shape[1]:
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be strictly ascending (so unique)"
        assert int(idx.min()) >= 0 and int(idx.max()) < N
    if name != "visionzip":
        assert idx.shape == (B, k)
    if sel.scores is not None:
        assert sel.scores.shape == (B, N)
    if k == N:
        assert torch.equal(out, signals.features)
        assert sel.num_merged == 0

    again = run(name, signals, k)
    assert torch.equal(again.indices, idx)
    assert torch.equal(again.output(signals.features), out)

    for i in range(B):
        alone = run(name, image(signals, i), k)
        assert torch.equal(alone.indices, idx[i : i + 1])
        torch.testing.assert_close(alone.output(signals.features[i : i + 1]), out[i : i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SELECTORS)
def test_budget_out_of_range_is_an_error(name):
    signals = make_signals()
    for k in (0, N + 1):
        with pytest.raises(ValueError):
            run(name, signals, k)


def test_topk_sorted_orders_close_scores_by_value_and_exact_ties_by_index():
    from tokensieve.methods.base import topk_sorted

    assert topk_sorted(torch.tensor([[1e-12, 1.5e-12]]), 1).tolist() == [[1]]  # distinct, however close
    assert topk_sorted(torch.tensor([[2.0, 1e-13, 3e-13, 2e-13]]), 2).tolist() == [[0, 2]]
    assert topk_sorted(torch.tensor([[0.5, 1.0, 0.5, 1.0, 0.5]]), 3).tolist() == [[0, 1, 3]]  # ties: lower index
    assert topk_sorted(torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float16), 2).tolist() == [[0, 1]]
