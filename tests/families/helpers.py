"""Helpers shared by the family tests: greedy / logits calls, the methods a family's adapter supports, the
in-encoder equivalence helpers (``CutUnits``, ``assert_unit_cut_equals_pick``), the VisPruner and adaptive checks."""

from __future__ import annotations

import torch

from tokensieve import Sieve
from tokensieve.methods.base import EncoderCut, EncoderMethod, EncoderPlan, Method, Selection, keep_with_cls


def greedy(model, inputs, n=4):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def logits(model, inputs):
    with torch.inference_mode():
        return model(**inputs).logits


def methods_for(adapter_cls, *, in_llm: bool = False) -> list[str]:
    """Registered methods whose stages (an in-LLM companion included) the family's adapter supports; pre-LLM ones
    only unless ``in_llm`` (in-LLM methods need deeper LMs than the family fixtures have; conformance.py's have 4)."""
    from tokensieve.methods import get_method, method_names
    from tokensieve.methods.base import IN_LLM

    out = []
    for name in method_names():
        method = get_method(name)()
        stages = {method.stage} | ({IN_LLM} if method.llm_companion() is not None else set())
        request = method.request(24, 23)
        kinds = {f for f in vars(request) if getattr(request, f)}
        if (
            stages <= set(adapter_cls.stages)
            and kinds <= set(adapter_cls.signal_kinds)
            and (in_llm or IN_LLM not in stages)
        ):
            out.append(name)
    return out


# -- in-encoder equivalence helpers (shared by the family tests) -------------------------------------------------


class CutUnits(EncoderMethod):
    """Keeps the same units of every candidate set after one block; with ``merge`` it also folds every dropped
    unit into the first kept one, saying so in ``groups`` unless ``tell`` is off."""

    name = "cut-units"
    description = "test helper"

    def __init__(self, layer, units, merge=False, tell=True):
        self.layer, self.units, self.merge, self.tell = layer, torch.tensor(units), merge, tell

    def plan(self, num_layers, feature_layer):
        return EncoderPlan((self.layer,))

    def cut(self, state):
        # rows may be in another order than the units (Qwen2.5-VL's windows): find the wanted units by position
        found = torch.isin(state.positions[:, 1:], self.units)
        keep = keep_with_cls(torch.stack([row.nonzero().flatten() for row in found]))
        if not self.merge:
            return EncoderCut(keep)
        rows = keep[0, 1:] - 1
        n = state.hidden.shape[1] - 1
        slot = torch.zeros(n, dtype=torch.long)
        slot[rows] = torch.arange(len(rows))
        sizes = state.sizes[0, 1:]
        mass = torch.zeros(len(self.units)).scatter_add_(0, slot, sizes)
        hidden = (
            torch.zeros(len(self.units), state.hidden.shape[-1]).index_add_(
                0, slot, state.hidden[0, 1:] * sizes[:, None]
            )
            / mass[:, None]
        )
        return EncoderCut(
            keep,
            hidden=torch.cat([state.hidden[:, :1], hidden[None]], 1),
            sizes=torch.cat([torch.ones(1), mass])[None],
            groups=slot[None] if self.tell else None,
        )


class PickUnits(Method):
    name = "pick-units"
    description = "test helper"

    def __init__(self, units):
        self.units = torch.tensor(units)

    def select(self, signals, k):
        return Selection(indices=self.units[None].expand(signals.batch, -1))


def assert_unit_cut_equals_pick(model, inputs, layer, units, scope):
    """In-encoder cut of ``units`` (patches, merge units, shuffle groups, pooling windows) after ``layer``, the one
    producing the features, == pre-projector pick of the same tokens: no later layer mixes the kept rows, so
    both paths must hand the LM the same tokens. Returns the cut's report."""
    cut = Sieve(CutUnits(layer, units), len(units), scope=scope)
    pick = Sieve(PickUnits(units), len(units), scope=scope)
    with cut(model):
        got = logits(model, inputs)
    with pick(model):
        want = logits(model, inputs)
    assert [im.kept_indices for im in cut.last_report.images] == [im.kept_indices for im in pick.last_report.images]
    assert [im.tokens_out for im in cut.last_report.images] == [im.tokens_out for im in pick.last_report.images]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return cut.last_report


def assert_vispruner_ranks_like_fastervlm(model, inputs, k, scope="image"):
    """VisPruner's important tokens come from the same [CLS] (or CLS-free fallback) row as FasterVLM's: with
    ``important_ratio=1.0`` it must keep exactly FasterVLM's tokens; at the default split it keeps k as well."""
    from tokensieve import Sieve

    kept = {}
    for name, params in (("fastervlm", {}), ("vispruner", {"important_ratio": 1.0}), ("vispruner", {})):
        sieve = Sieve(name, k, scope=scope, **params)
        with sieve(model):
            logits(model, inputs)
        kept[(name, bool(params))] = [im.kept_indices for im in sieve.last_report.images]
    assert kept[("vispruner", True)] == kept[("fastervlm", False)]
    assert [len(x) for x in kept[("vispruner", False)]] == [len(x) for x in kept[("fastervlm", False)]]
    assert kept[("vispruner", False)] != kept[("fastervlm", False)], "the diverse half should differ somewhere"


def assert_adaptive_is_per_set(model, batch, singles, budget, scope="image", method="evocut"):
    """An adaptive budget on a family: calibrated on ``batch``, each candidate set's count stays in its bounds,
    the batch keeps what the calibration counted, and each sample alone keeps exactly what it kept in the batch."""
    from tokensieve import Sieve

    sieve = Sieve(method, budget, scope=scope)
    cal = sieve.calibrate(model, [batch])
    assert abs(cal.achieved_mean - cal.target_mean) < 1e-9 and len(set(cal.counts)) > 1
    with sieve(model):
        logits(model, batch)
    report = sieve.last_report
    assert sum(len(im.kept_indices) for im in report.images) == sum(cal.counts)
    for b, single in enumerate(singles):
        with sieve(model):
            logits(model, single)
        mine = [im.kept_indices for im in report.images if im.sample == b]
        assert [im.kept_indices for im in sieve.last_report.images] == mine
    return cal, report
