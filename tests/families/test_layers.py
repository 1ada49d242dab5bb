"""Layer parameters are checked against the model's real depth at ``apply()``: deep and shallow LLaVA-1.5 towers,
the default model, the in-LLM layers, a deep Qwen-VL tower (every family's own depth: test_conformance_hygiene.py).

An encoder layer a method names must exist in this model's vision encoder (and lie before the features it reads);
a decoder layer an in-LLM method names must exist in this model's LM. Valid settings on a deep tower are accepted,
and a refused one fails at ``apply()`` (not at the first call) with the parameter, its value and the range,
leaving the model untouched.
"""

import pytest
import torch

from tokensieve import Sieve
from tokensieve.errors import ParameterError
from tokensieve.models.tiny import build_tiny_llava, demo_image

from ..conftest import prompt
from . import builders as F


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


DEEP_SETTINGS = [
    ("evocut", dict(start_layer=26)),
    ("vtc_cls", dict(start_layer=26)),
    ("fastervlm", dict(layer=27)),
    ("hiprune", dict(object_layer=26)),
    ("evoprune", dict(end_layer=26, start_layer=20)),
]


@pytest.fixture(scope="module")
def deep_llava():
    """A 30-layer CLIP tower (features from hidden_states[-2] = 29, the output of layer 28)."""
    return build_tiny_llava(image_size=32, patch_size=4, vision_layers=30, text_layers=2)


@pytest.mark.parametrize("method,params", DEEP_SETTINGS)
def test_deep_tower_accepts_layers_a_24_layer_check_refused(deep_llava, method, params):
    model, processor = deep_llava
    batch = processor(images=[demo_image(64, 0)], text=[prompt(processor, "what ?")], return_tensors="pt")
    sieve = Sieve(method, 16, **params)
    with sieve(model), torch.inference_mode():
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert sieve.last_report.tokens_out == 16


@pytest.mark.parametrize("method,params", DEEP_SETTINGS)
def test_shallow_tower_refuses_them_at_apply(tiny, method, params):
    model, _ = tiny  # 6 CLIP layers, features hidden_states[5]
    (name, value), *_ = params.items()
    msg = _refused(model, Sieve(method, 16, **params), name, str(value), "6 layers")
    assert method in msg


def test_default_model_refuses_a_start_layer_past_its_8_layers():
    from tokensieve.tools.evaluate import load_model

    model, _ = load_model()
    _refused(model, Sieve("evocut", 16, start_layer=20), "start_layer=20", "8 layers", "<= 8")
    Sieve("evocut", 16, start_layer=6).apply(model).remove()


def test_in_llm_layers_are_checked_against_the_lm(tiny):
    model, _ = tiny  # a 2-layer LM
    _refused(model, Sieve("fastv", 16, layer=2), "fastv layer=2", "1..1", "2 decoder layers")
    _refused(model, Sieve("dart", 16, layer=5), "dart layer=5")
    _refused(model, Sieve(["evocut", "fastv"], [32, 16]), "fastv layer=2")  # its default layer
    before = _hooks(model)
    Sieve("fastv", 16, layer=1).apply(model).remove()
    assert _hooks(model) == before


# -- Qwen-VL ------------------------------------------------------------------------------------------------------


def test_deep_qwen_tower_accepts_a_late_layer():
    model, proc = F.build_tiny_qwen("qwen2_vl", vision_layers=30)
    batch = proc(["user : <image> what ? assistant :"], images=[demo_image(64, 0)])
    sieve = Sieve("fastervlm", 4, layer=27)
    with sieve(model), torch.inference_mode():
        model.generate(**batch, max_new_tokens=1, do_sample=False)
    assert sieve.last_report.tokens_out == 4
    _refused(F.build_tiny_qwen("qwen2_vl")[0], Sieve("fastervlm", 4, layer=27), "layer=27", "4 layers")
