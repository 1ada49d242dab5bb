"""The embedded default model: loads offline with the stock Auto classes and answers from generate()."""

from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from tokensieve.data import load
from tokensieve.evaluate import DEFAULT_MODEL_DIR, EMBEDDED_MODELS, load_model, predict


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
    """Above 85% on fixed test subsets (the issue's bar), far above what an image-blind model gets.

    The shipped checkpoint measures (model card) easy-VQA 97.1% on the whole test split, shapes 67.0%: counting and
    the smallest shape's colour at 99.4%, digits and relations at chance. So the shapes subset here is the families
    the model has learned, and a broken checkpoint, processor or loading path fails here.
    """
    from tokensieve.data import shapes

    model, processor = load_model()
    mixed = load("easyvqa", "test", 200)  # evenly spaced over the split: every family
    shape = [s for s in load("easyvqa", "test", 600) if s.family == "shape"][:48]
    learned = [shapes.sample("test", i, family=f) for i in range(48) for f in ("count", "smallest")]
    for name, samples, floor, chance in (("easy-VQA, 200 of the test split", mixed, 0.85, None),
                                         ("easy-VQA shape", shape, 0.85, 1 / 3),
                                         ("shapes count + smallest-shape colour", learned, 0.85, 1 / 5)):
        pred = predict(model, processor, samples, batch_size=48)
        acc = sum(a == s.answer for a, s in zip(pred.answers, samples)) / len(samples)
        assert acc > floor, (name, acc, chance)


def test_right_padded_batch_answers_as_each_prompt_alone():
    """The README's padding claim on a trained model: a right-padded batch's generate() gives each prompt the answer
    it gets alone (transformers itself continues a right-padded row after its padding; the sieve re-pads the shrunk
    prompt on the left), and forward() keeps right padding with per-sample logits equal to the single calls."""
    import torch

    from tokensieve import Sieve
    from tokensieve.data import shapes
    from tokensieve.train import prompt_text

    model, processor = load_model()
    samples = [shapes.sample("test", i, family=f) for i, f in enumerate(["count", "position", "relation", "smallest"])]
    texts = [prompt_text(processor, s.question) for s in samples]
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "right"
    try:
        batch = processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = side
    assert bool((batch["attention_mask"][:, -1] == 0).any()), "the questions differ in length"
    n_in = batch["input_ids"].shape[1]
    from tokensieve.methods import get_method

    for sieve in (Sieve("evoprune", 36), Sieve([get_method("evocut")(), get_method("fastv")(layer=1)], [36, 24])):
        with sieve(model), torch.inference_mode():
            together = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            answers = processor.batch_decode(together[:, n_in:], skip_special_tokens=True)
            full = model(**batch).logits
            mask = sieve.last_report.attention_mask.bool()
            for s, (sample, text) in enumerate(zip(samples, texts)):
                alone = processor(images=[sample.image], text=[text], return_tensors="pt")
                out = model.generate(**alone, max_new_tokens=4, min_new_tokens=4, do_sample=False)
                assert answers[s] == processor.decode(out[0, alone["input_ids"].shape[1]:], skip_special_tokens=True)
                if sieve.llm_method is None:
                    torch.testing.assert_close(full[s][mask[s]], model(**alone).logits[0], rtol=1e-4, atol=1e-4)


def test_the_576_token_variant_is_a_stock_llava_on_the_llava15_grid():
    """``default-576``: the same recipe at 336 px with 14-px patches, [CLS] + 24 x 24, features from layer -2."""
    path = EMBEDDED_MODELS["default-576"].path
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    assert isinstance(model, LlavaForConditionalGeneration)
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size, model.config.vision_feature_layer) == (336, 14, -2)
    assert processor.num_additional_image_tokens == 1
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 25 * 2**20


def test_the_576_token_variant_answers_from_the_image_on_fixed_test_subsets():
    """Floors a little under what the card measures on the whole test sets (shapes 79.6%, easy-VQA 92.4%; digits 96.7%),
    per family where the model has learned it; an image-blind model sits at chance on each."""
    from tokensieve.data import shapes

    model, processor = load_model("default-576")
    mixed = load("easyvqa", "test", 150)
    families = ("count", "digit", "smallest")
    learned = [shapes.sample("test", i, family=f) for i in range(32) for f in families]
    for name, samples, floor in (("easy-VQA, 150 of the test split", mixed, 0.85),
                                 ("shapes count + digit + smallest-shape colour", learned, 0.85)):
        pred = predict(model, processor, samples, batch_size=48)
        acc = sum(a == s.answer for a, s in zip(pred.answers, samples)) / len(samples)
        assert acc > floor, (name, acc)
