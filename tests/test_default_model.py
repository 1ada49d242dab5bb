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


def test_answers_from_the_image_on_fixed_test_subsets():
    """Floors below what the shipped checkpoint measures (model card), far above what an image-blind model gets.

    The issue's 85% on a mixed subset is not reached (see the card: shapes 50.7%, easy-VQA 79.9%); these subsets
    are the families the model has learned, so a broken checkpoint, processor or loading path fails here.
    """
    from tokensieve.data import shapes

    model, processor = load_model()
    colour = [s for s in load("easyvqa", "test", 600) if s.family == "color"][:48]
    smallest = [shapes.sample("test", i) for i in range(4, 4 + 6 * 48, 6)]
    mixed = load("easyvqa", "test", 96)
    for name, samples, floor, chance in (("easy-VQA colour", colour, 0.9, 1 / 8),
                                         ("shapes smallest-shape colour", smallest, 0.7, 1 / 5),
                                         ("easy-VQA all families", mixed, 0.7, None)):
        assert all(s.family == samples[0].family for s in samples) or chance is None
        pred = predict(model, processor, samples, batch_size=48)
        acc = sum(a == s.answer for a, s in zip(pred.answers, samples)) / len(samples)
        assert acc > floor, (name, acc, chance)
