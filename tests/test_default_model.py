"""The embedded default model: loads offline with the stock Auto classes and answers from generate()."""

from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from tokensieve.data import load
from tokensieve.evaluate import DEFAULT_MODEL_DIR, load_model, predict


def test_loads_offline_as_a_stock_llava_with_a_cls_tower():
    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    assert isinstance(model, LlavaForConditionalGeneration)
    cfg = model.config
    assert cfg.vision_feature_layer == -2 and cfg.vision_config.num_hidden_layers >= 8
    assert (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 == 144
    assert processor.num_additional_image_tokens == 1  # CLIP CLS present
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert size < 25 * 2**20


def test_answers_a_fixed_subset_of_both_test_sets():
    model, processor = load_model()
    for name, n in (("shapes", 120), ("easyvqa", 60)):
        samples = load(name, "test", n)
        pred = predict(model, processor, samples, batch_size=30)
        acc = sum(a == s.answer for a, s in zip(pred.answers, samples)) / n
        assert acc > 0.85, (name, acc)
