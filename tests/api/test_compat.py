"""The sieve under the ways people actually call models: pipelines, half precision, dict outputs, beams, configs."""

import pytest
import torch
from transformers import pipeline

from tokensieve import Sieve
from tokensieve.models.tiny import build_tiny_llava, demo_image

from ..conftest import N_TOKENS, TINY, prompt


def test_image_text_to_text_pipeline(tiny):
    model, processor = tiny
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": demo_image(96)}, {"type": "text", "text": "what is this ?"}],
        }
    ]
    sieve = Sieve("evocut", 8)
    with sieve(model):
        out = pipe(text=messages, max_new_tokens=3, do_sample=False)
    assert sieve.last_report.tokens_out == 8
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    assert "generate" not in model.__dict__


def test_generate_dict_output_and_beams(tiny, single):
    model, _ = tiny
    n_prompt = single["input_ids"].shape[1]
    with Sieve("divprune", 10)(model), torch.inference_mode():
        out = model.generate(
            **single,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
        beams = model.generate(
            **single, max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2
        )
    assert out.sequences.shape == (1, n_prompt + 3) and len(out.scores) == 3
    assert torch.equal(out.sequences[:, :n_prompt], single["input_ids"])
    assert beams.shape == (2, n_prompt + 3)
    assert torch.equal(beams[:, :n_prompt], single["input_ids"].expand(2, -1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(single, dtype):
    model, _ = build_tiny_llava(**TINY)
    model = model.to(dtype)
    inputs = dict(single, pixel_values=single["pixel_values"].to(dtype))
    with torch.inference_mode():
        ref = model(**inputs).logits
    for method in ("evocut", "visionzip", "divprune"):
        sieve = Sieve(method, N_TOKENS)
        with sieve(model), torch.inference_mode():
            assert torch.equal(model(**inputs).logits, ref)
        sieve = Sieve(method, 12)
        with sieve(model), torch.inference_mode():
            out = model(**inputs).logits
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert sieve.last_report.tokens_out == 12


@pytest.mark.parametrize("feature_layer,strategy", [([-2, -4], "default"), (-2, "full"), (-1, "default")])
def test_other_feature_layer_configs(images, feature_layer, strategy):
    """LLaVA configs may concatenate several layers or feed the CLS token too: counts and keep-all still hold."""
    model, processor = build_tiny_llava(
        **TINY, vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy
    )
    n = N_TOKENS + (strategy == "full")
    inputs = processor(images=[images[0]], text=[prompt(processor, "what is this ?")], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == n
    with torch.inference_mode():
        ref = model(**inputs).logits
    for method in ("evocut", "fastervlm", "visionzip", "pool", "divprune", "random", "vtc_cls", "evoprune", "flowcut"):
        if method == "pool" and strategy == "full":
            budgets = [n, 17]  # the CLS is kept as is, the 8x8 grid pools to 4x4
        else:
            budgets = [n, 12]
        for budget in budgets:
            sieve = Sieve(method, budget)
            with sieve(model), torch.inference_mode():
                out = model(**inputs).logits
            report = sieve.last_report
            assert report.images[0].tokens_in == n and report.tokens_out == budget
            if budget == n:
                assert torch.equal(out, ref), method
            assert all(0 <= i < N_TOKENS for i in report.images[0].kept_indices)


def test_no_global_state_touched(tiny, single):
    """No attention function, mask function or config value is registered or changed by a sieve."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model, _ = tiny
    config = model.config.to_dict()
    attn = dict(AttentionInterface._global_mapping)
    masks = dict(AttentionMaskInterface._global_mapping)
    with Sieve("visionzip", 16)(model), torch.inference_mode():
        model(**single)
        model.generate(**single, max_new_tokens=2)
    assert model.config.to_dict() == config
    assert dict(AttentionInterface._global_mapping) == attn
    assert dict(AttentionMaskInterface._global_mapping) == masks


def test_text_only_calls_pass_through(tiny):
    model, processor = tiny
    ids = processor.tokenizer(["what is in the picture ?"], return_tensors="pt")
    with torch.inference_mode():
        ref = model(**ids).logits
        ref_gen = model.generate(**ids, max_new_tokens=3, do_sample=False)
    sieve = Sieve("evocut", 8)
    with sieve(model), torch.inference_mode():
        assert torch.equal(model(**ids).logits, ref)
        assert torch.equal(model.generate(**ids, max_new_tokens=3, do_sample=False), ref_gen)
    assert sieve.last_report is not None and not sieve.last_report.visual_input


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_last_report_follows_a_text_only_call(tiny, single, call):
    """After an image call, a text-only call must not leave the image call's numbers in ``last_report``."""
    model, processor = tiny
    ids = processor.tokenizer(["what is in the picture ?"], return_tensors="pt")
    sieve = Sieve("evocut", 8)
    with sieve(model), torch.inference_mode():
        model.generate(**single, max_new_tokens=2, do_sample=False)
        assert sieve.last_report.visual_input and sieve.last_report.tokens_out == 8
        if call == "forward":
            model(**ids)
        else:
            model.generate(**ids, max_new_tokens=2, do_sample=False)
    rep = sieve.last_report
    assert not rep.visual_input and rep.images == [] and rep.tokens_in == rep.tokens_out == 0
    assert rep.seq_len_in == rep.seq_len_out == ids["input_ids"].shape[1]
    assert rep.llm_layer_tokens == [[ids["input_ids"].shape[1]] * 2] and rep.llm_visual_tokens_avg == [0.0]
    assert "no visual input" in rep.summary()
    assert rep.to_dict()["visual_input"] is False


def test_own_decoding_loop_keeps_the_image_report(tiny, single):
    """Decoding steps that continue a sieved forward's cache are part of that call, not new text-only calls."""
    model, _ = tiny
    sieve = Sieve("evocut", 8)
    with sieve(model), torch.inference_mode():
        out = model(**single, use_cache=True)
        rep = sieve.last_report
        step = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([rep.attention_mask, torch.ones_like(step)], dim=1)
        model(input_ids=step, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    assert sieve.last_report is rep and rep.visual_input


def test_report_serialises(tiny, single):
    import json

    model, _ = tiny
    sieve = Sieve("visionzip", 16)
    with sieve(model), torch.inference_mode():
        model(**single)
    data = json.loads(json.dumps(sieve.last_report.to_dict()))
    (image,) = data["images"]
    assert image["tokens_out"] == 16 and image["merged"] == 3  # CLS + 2 contextual (round(16 * 5 / 32) = 2)
    assert len(image["kept_indices"]) == 13 and image["grid"] == [8, 8]


def test_unknown_arch_is_refused_with_the_known_names():
    from tokensieve.errors import UnsupportedModelError
    from tokensieve.models.archs import arch_config

    with pytest.raises(UnsupportedModelError, match="llava15-cpu"):
        arch_config("llava15-70b")
    cfg = arch_config("llava15-cpu")
    assert cfg.vision_config.image_size // cfg.vision_config.patch_size == 24
