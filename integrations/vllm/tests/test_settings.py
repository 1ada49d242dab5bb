"""Settings: merging server default and request, and every refusal, without an engine."""

import pytest

from tokensieve.budget import Scope
from tokensieve.methods import method_names
from tokensieve.plan import Target
from tokensieve_vllm.settings import (
    SettingsError,
    merge,
    resolve,
    runnable_methods,
    server_settings,
    split_kwargs,
)


def served(**facts) -> Target:
    from tokensieve_vllm.settings import served as narrow

    stages = facts.pop("stages", ("pre_projector", "post_projector", "in_encoder"))
    base = Target("LLaVA-1.5", "LlavaForConditionalGeneration", 8, (7,), 2, scopes=(Scope.IMAGE, Scope.CROP), **facts)
    return narrow(base, stages=stages)


LLAVA = served(limits={Scope.IMAGE: 144, Scope.CROP: 144})


class Config:
    def __init__(self, **tokensieve):
        self.tokensieve = tokensieve or None


def test_every_pre_llm_method_runs_and_every_in_llm_method_is_refused():
    runnable = set(runnable_methods(LLAVA))
    assert runnable == {
        "evocut",
        "divprune",
        "visionzip",
        "fastervlm",
        "vispruner",
        "pool",
        "random",
        "hiprune",
        "vtc_cls",
        "evoprune",
        "flowcut",
    }
    for name in ("fastv", "pdrop", "dart"):
        with pytest.raises(SettingsError, match="in-LLM.*KV cache") as err:
            resolve({"method": name, "budget": 64}, LLAVA)
        assert err.value.parameter == "tokensieve_method"
    assert set(method_names()) - runnable == {"fastv", "pdrop", "dart", "todre"}


def test_todre_second_stage_refused_first_stage_alone_runs():
    with pytest.raises(SettingsError, match="relevance"):
        resolve({"method": "todre", "budget": 64}, LLAVA)
    spec = resolve({"method": "todre", "budget": 64, "params": {"relevance": False}}, LLAVA)
    assert (spec.method, spec.k, spec.params) == ("todre", 64, {"relevance": False})


def test_in_encoder_refused_where_the_family_cannot_cut():
    no_cut = served(stages=("pre_projector", "post_projector"), limits={Scope.IMAGE: 144})
    with pytest.raises(SettingsError, match="in-encoder"):
        resolve({"method": "evoprune", "budget": 36}, no_cut)


@pytest.mark.parametrize("budget, k", [(64, 64), (144, 144), (0.25, 36), (1.0, 144)])
def test_budget_int_or_ratio(budget, k):
    assert resolve({"method": "evocut", "budget": budget}, LLAVA).k == k


@pytest.mark.parametrize(
    "budget, match",
    [
        (0, "at least one token"),
        (-3, "at least one token"),
        (145, "exceeds the 144 visual tokens"),
        ("64", "must be an int"),
        (12.5, "keep ratio"),
        (True, "must be an int"),
        (None, "needs a budget"),
        ([64], "must be an int"),
        ("adaptive:64", "not available under tokensieve-vllm"),
    ],
)
def test_bad_budgets_are_refused_clearly(budget, match):
    with pytest.raises(SettingsError, match=match) as err:
        resolve({"method": "evocut", "budget": budget}, LLAVA)
    assert err.value.parameter == "tokensieve_budget"


def test_other_scopes_refused():
    assert resolve({"method": "pool", "budget": 36, "scope": "crop"}, LLAVA).k == 36
    with pytest.raises(SettingsError, match="scope 'global'"):
        resolve({"method": "pool", "budget": 36, "scope": "global"}, LLAVA)


def test_unknown_method_params_and_keys():
    with pytest.raises(SettingsError, match="unknown method 'nope'; available: .*evocut"):
        resolve({"method": "nope", "budget": 8}, LLAVA)
    with pytest.raises(SettingsError, match="bad parameter for method .evocut.: it has no parameter .bogus."):
        resolve({"method": "evocut", "budget": 8, "params": {"bogus": 1}}, LLAVA)
    # layer parameters are checked against the real depth before any engine work
    with pytest.raises(SettingsError, match="fastervlm layer=30 must be in"):
        resolve({"method": "fastervlm", "budget": 8, "params": {"layer": 30}}, LLAVA)
    with pytest.raises(SettingsError, match="unknown tokensieve setting 'tokensieve_k'"):
        split_kwargs({"tokensieve_k": 3})
    with pytest.raises(SettingsError, match="unknown key"):
        server_settings(Config(method="evocut", k=3), None)


def test_no_method_means_stock_tokens():
    assert resolve({}, LLAVA) is None
    assert resolve({"method": "none", "budget": 3}, LLAVA) is None


def test_request_overrides_server_default():
    server = server_settings(
        Config(method="evocut", budget=64, params={"num_groups": 4}), {"tokensieve_budget": 32, "do_resize": True}
    )
    assert server == {"method": "evocut", "budget": 32, "params": {"num_groups": 4}}
    same = merge(server, {"budget": 16, "params": {"alpha": 0.5}})
    assert same == {"method": "evocut", "budget": 16, "params": {"num_groups": 4, "alpha": 0.5}}
    # another method starts from its own defaults: the server's params belong to evocut
    other = merge(server, {"method": "divprune"})
    assert resolve(other, LLAVA).params == {} and resolve(other, LLAVA).k == 32
    assert resolve(merge(server, {"method": "none"}), LLAVA) is None


def test_spec_round_trip():
    spec = resolve({"method": "visionzip", "budget": 0.5, "params": {"contextual": 8}}, LLAVA)
    from tokensieve_vllm.settings import SieveSpec

    again = SieveSpec.from_json(spec.to_json())
    assert again == spec and again.build().contextual == 8


def test_other_families_and_towers_refused_at_start_up():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaNextConfig, SiglipVisionConfig

    from tokensieve_vllm.settings import llava_target as llava_family

    fam = llava_family(LlavaConfig(vision_config=CLIPVisionConfig(image_size=96, patch_size=8, num_hidden_layers=8)))
    assert (fam.tokens, fam.feature_layers, fam.encoder_layers) == (144, (7,), 8)
    with pytest.raises(ValueError, match="'llava_next', served by TokenSieveLlavaNextForConditionalGeneration"):
        llava_family(LlavaNextConfig())
    with pytest.raises(ValueError, match="'mllama', which tokensieve-vllm does not support yet"):
        llava_family(type("Config", (), {"model_type": "mllama"})())
    with pytest.raises(ValueError, match="CLIP vision tower"):
        llava_family(LlavaConfig(vision_config=SiglipVisionConfig()))


def test_qwen_family_budgets_per_image_and_refusals():
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    from tokensieve_vllm.settings import qwen_target as qwen_family

    fam = qwen_family(Qwen2_5_VLConfig(vision_config={"depth": 4}), 36)
    assert (fam.encoder_layers, fam.feature_layer, fam.tokens) == (4, 4, 36)
    # in-encoder methods are refused on vLLM's Qwen ViT; in-LLM ones everywhere
    assert set(runnable_methods(fam)) == set(runnable_methods(LLAVA)) - {"evoprune", "flowcut"}
    with pytest.raises(SettingsError, match="in-encoder.*not ported to vLLM"):
        resolve({"method": "flowcut", "budget": 9}, fam)
    # an image's count depends on its size: the budget is resolved against that image
    assert resolve({"method": "divprune", "budget": 0.5}, fam, 18).k == 9
    assert resolve({"method": "divprune", "budget": 18}, fam, 18).k == 18
    with pytest.raises(SettingsError, match="exceeds the 18 visual tokens of this image"):
        resolve({"method": "divprune", "budget": 19}, fam, 18)
    with pytest.raises(SettingsError, match="scope 'frame'"):
        resolve({"method": "divprune", "budget": 9, "scope": "frame"}, fam, 18)
    with pytest.raises(ValueError, match="'qwen2_vl', which tokensieve-vllm does not support yet"):
        qwen_family(Qwen2VLConfig(), 36)


def test_next_family_fixed_newline_policies_and_refusals():
    from transformers import CLIPVisionConfig, LlavaNextConfig

    from tokensieve_vllm.llava_next import next_family

    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=16, patch_size=4, num_hidden_layers=4),
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        vision_feature_layer=-2,
    )
    fam = next_family(config)
    assert (fam.tokens, fam.feature_layers, fam.newlines) == (80, (3,), ("all", "none"))  # 5 crops of 16 patches
    assert resolve({"method": "divprune", "budget": 20}, fam).newlines == "all"
    assert resolve({"method": "divprune", "budget": 20, "newlines": "none"}, fam).newlines == "none"
    with pytest.raises(SettingsError, match="newlines 'rows' is not supported on LLaVA-NeXT"):
        resolve({"method": "divprune", "budget": 20, "newlines": "rows"}, fam)
    with pytest.raises(SettingsError, match="in-encoder.*only known after the encoder"):
        resolve({"method": "flowcut", "budget": 20}, fam)
    with pytest.raises(SettingsError, match="no newline tokens"):
        resolve({"method": "divprune", "budget": 20, "newlines": "all"}, LLAVA)
