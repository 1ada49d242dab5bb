"""Conformance, hygiene: a family's record says what its adapter takes; nothing stays attached after a sieve exits
and a vanilla model in the same process is unaffected; layer parameters are checked against the real encoder and
LM depth at ``apply()``."""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.adapters import get_adapter
from tokensieve.errors import ParameterError

from .conformance import NAMES, REPRESENTATIVE, assert_same, generate, logits, pairs, sieve_for, snapshot, twin


@pytest.mark.parametrize("fam", NAMES, indirect=True)
def test_the_record_says_what_the_adapter_takes(fam):
    adapter = get_adapter(fam.model)
    assert set(fam.family.scopes) == {s.value for s in adapter.scopes}
    assert set(fam.family.stages) == set(adapter.stages)


@pytest.mark.parametrize("fam,method", pairs(REPRESENTATIVE), indirect=["fam"])
def test_nothing_stays_attached_after_exit(fam, method):
    """While attached and after exit a never-sieved copy of the model answers as before; after exit the model's
    attributes, hooks and weights are as they were, its answers are vanilla, and another sieve attaches."""
    model, inputs = fam.model, fam.make(1)
    other = twin(fam.name)
    ref = logits(other, inputs)
    before, other_before = snapshot(model), snapshot(other)
    sieve = sieve_for(method, 0.5)
    with sieve(model) as handle:
        assert "generate" in model.__dict__
        logits(model, inputs)
        generate(model, inputs, n=2)
        assert torch.equal(logits(other, inputs), ref)
    assert not handle.active
    assert_same(before, snapshot(model))
    assert_same(other_before, snapshot(other))
    assert torch.equal(logits(model, inputs), ref)
    Sieve("random", 4).apply(model).remove()
    assert_same(before, snapshot(model))


def _hooks(model) -> int:
    # transformers keeps its own output-recording hooks once a call asked for them: compare counts, not zero
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _refused(model, sieve, *needles):
    before = _hooks(model)
    with pytest.raises(ParameterError) as info:
        sieve.apply(model)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert "generate" not in model.__dict__ and _hooks(model) == before
    Sieve("random", 4).apply(model).remove()  # nothing was left attached: another sieve applies
    return msg


@pytest.mark.parametrize("fam", NAMES, indirect=True)
def test_layer_parameters_are_checked_against_the_real_encoder_and_lm_depth(fam):
    """A layer beyond the encoder's depth (or the LM's, for in-LLM methods) is refused at ``apply()``, naming the
    parameter, its value and the depth, leaving the model untouched; the deepest valid layers are accepted."""
    model = fam.model
    adapter = get_adapter(model)
    depth = adapter.num_layers
    lm = len(adapter.decoder_layers())
    _refused(model, Sieve("fastervlm", 4, layer=depth), f"fastervlm layer={depth}", f"{depth} layers")
    _refused(model, Sieve("vtc_cls", 4, start_layer=depth), f"start_layer={depth}")
    _refused(model, Sieve("evoprune", 4, end_layer=depth), f"end_layer={depth}")
    _refused(model, Sieve("fastv", 4, layer=lm), f"fastv layer={lm}", f"{lm} decoder layers")
    before = _hooks(model)
    for ok in (
        Sieve("fastervlm", 4, layer=depth - 1),
        Sieve("evoprune", 4, start_layer=0),
        Sieve("fastv", 4, layer=lm - 1),
    ):
        ok.apply(model).remove()
    assert _hooks(model) == before and "generate" not in model.__dict__
