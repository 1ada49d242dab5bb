"""One bad setting, one message, whichever front door it came through.

``Sieve`` (transformers), the lmms-eval wrapper's builder (``--model_args``, checked against the loaded model as the
wrapper does right after loading) and the vLLM plugin's settings resolver (a request's ``tokensieve_*`` keys) all
build and check a setting with :mod:`tokensieve.plan`. Fed the same bad settings for the same model, they must refuse
with the same text. The plugin's resolver needs no vLLM (it is the front end's torch-only part), so it runs here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tokensieve import Sieve, TokensieveError, plan
from tokensieve.adapters import get_adapter
from tokensieve.lmms_eval.settings import build_sieve

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integrations" / "vllm" / "src"))
from tokensieve_vllm.settings import SettingsError, llava_target, resolve  # noqa: E402

from ..conftest import N_TOKENS  # noqa: E402

# (what is wrong, Sieve(...) arguments, lmms-eval (method, budget, params), vLLM request settings)
BAD = [
    ("a budget of 0", ("evocut", 0), {}, ("evocut", 0, {}), {"method": "evocut", "budget": 0}),
    (
        "a budget above the token count",
        ("evocut", N_TOKENS + 1),
        {},
        ("evocut", N_TOKENS + 1, {}),
        {"method": "evocut", "budget": N_TOKENS + 1},
    ),
    (
        "an unknown parameter",
        ("evocut", 16),
        {"nosuch": 1},
        ("evocut", 16, {"evocut": {"nosuch": 1}}),
        {"method": "evocut", "budget": 16, "params": {"nosuch": 1}},
    ),
    (
        "a layer beyond the encoder's depth",
        ("fastervlm", 16),
        {"layer": 30},
        ("fastervlm", 16, {"fastervlm": {"layer": 30}}),
        {"method": "fastervlm", "budget": 16, "params": {"layer": 30}},
    ),
    (
        "a bad parameter value",
        ("evocut", 16),
        {"num_groups": 0},
        ("evocut", 16, {"evocut": {"num_groups": 0}}),
        {"method": "evocut", "budget": 16, "params": {"num_groups": 0}},
    ),
]


def _message(build) -> str:
    with pytest.raises(TokensieveError) as err:
        build()
    return str(err.value)


@pytest.mark.parametrize("what, args, params, lmms, request_settings", BAD, ids=[b[0] for b in BAD])
def test_every_front_door_refuses_with_the_same_text(tiny, what, args, params, lmms, request_settings):
    model, _ = tiny
    by_sieve = _message(lambda: Sieve(*args, **params).check(model))
    method, budget, lmms_params = lmms
    by_lmms = _message(lambda: build_sieve(method, budget, "image", lmms_params).check(model))
    with pytest.raises(SettingsError) as err:
        resolve(request_settings, llava_target(model.config))
    assert by_sieve == by_lmms == str(err.value), what
    assert model.__dict__.get("generate") is None  # checking attached nothing


def test_an_in_llm_method_where_only_pre_llm_runs_is_refused_by_the_one_rule(tiny):
    """transformers runs in-LLM methods, so ``Sieve`` and the lmms-eval wrapper accept FastV; vLLM cannot (it sizes a
    request's KV cache before the LM runs). The vLLM resolver's refusal is the rule set's own text: the same sieve,
    checked against the vLLM host's target, gives exactly it."""
    model, _ = tiny
    sieve = Sieve("fastv", 16, layer=1)
    sieve.check(model)
    build_sieve("fastv", 16, "image", {"fastv": {"layer": 1}}).check(model)
    served = llava_target(model.config)
    with pytest.raises(SettingsError) as err:
        resolve({"method": "fastv", "budget": 16, "params": {"layer": 1}}, served)
    with pytest.raises(TokensieveError) as same:
        plan.check(sieve.stages, served)
    assert str(err.value) == str(same.value)
    assert "in-LLM" in str(err.value) and "KV cache" in str(err.value)


def test_the_adapter_describes_the_model_the_plugin_narrows(tiny):
    """The vLLM target is the transformers adapter's description with fewer stages: the facts are read once."""
    model, _ = tiny
    core = get_adapter(model).target()
    served = llava_target(model.config)
    same = ("family", "model", "encoder_layers", "feature_layers", "llm_layers", "num_prefix", "limits")
    assert [getattr(core, f) for f in same] == [getattr(served, f) for f in same]
    assert set(served.stages) < set(core.stages) and served.host != core.host
