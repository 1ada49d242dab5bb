"""A few steps of the real training loop at toy sizes: it learns, saves, and the saved folder loads offline."""

import json

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tokensieve.train import Mixture, TrainConfig, make_batch, save, train

TOY = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64,
           text_width=32, text_layers=1, text_heads=2, text_kv_heads=2, text_mlp=64, batch_size=8, steps=12,
           warmup=2, lr=3e-3, log_every=1, threads=1)


def test_training_steps_lower_the_loss_and_save_a_loadable_model(tmp_path):
    cfg = TrainConfig(**TOY)
    before = torch.get_num_threads()
    model, processor, history = train(cfg, log=lambda m: None)
    torch.set_num_threads(before)
    assert len(history) == cfg.steps
    losses = [h["loss"] for h in history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5  # from ~log(vocab) towards the answer prior
    save(model, processor, tmp_path, cfg, history, "card\n")
    assert json.loads((tmp_path / "training.json").read_text())["config"]["steps"] == cfg.steps
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    proc = AutoProcessor.from_pretrained(tmp_path)
    batch = make_batch(proc, *Mixture(cfg).draw(3))
    with torch.no_grad():
        a = loaded(**batch).loss
        b = model(**batch).loss
    torch.testing.assert_close(a, b)


def test_same_seed_same_batches():
    cfg = TrainConfig(**TOY)
    a, b = Mixture(cfg).draw(6), Mixture(cfg).draw(6)
    assert a[1:] == b[1:]


def test_labels_cover_only_the_answer_and_eos():
    cfg = TrainConfig(**TOY, describe_share=0.0, turns=1)
    from tokensieve.train import build_model

    _, processor = build_model(cfg)
    batch = make_batch(processor, *Mixture(cfg).draw(4))
    labelled = batch["labels"] != -100
    assert labelled.sum().item() == 8 and labelled[:, -2:].all()
    assert (batch["labels"][:, -1] == processor.tokenizer.eos_token_id).all()


def test_multi_word_answers_are_labelled_whole_and_rows_stay_left_padded():
    from tokensieve.data import shapes
    from tokensieve.train import build_model

    _, processor = build_model(TrainConfig(**TOY))
    tok = processor.tokenizer
    a, b = shapes.sample("train", 3, "describe"), shapes.sample("train", 4, "count")
    batch = make_batch(processor, [a.image, b.image], [a.question, b.question], [a.answer, b.answer])
    for row, s in enumerate((a, b)):
        want = tok(s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = batch["labels"][row]
        assert labels[labels != -100].tolist() == want
        assert batch["input_ids"][row, -len(want):].tolist() == want  # answers end every row
        mask = batch["attention_mask"][row]
        assert mask[-1] == 1 and (mask.cumsum(0) > 0).sum() == mask.sum()  # padding only on the left
    assert len(want) == 2 and (batch["labels"][0] != -100).sum() > 10


def test_a_conversation_starts_with_the_eval_prompt_and_labels_every_answer():
    from tokensieve.data import shapes
    from tokensieve.train import build_model, prompt_text

    _, processor = build_model(TrainConfig(**TOY))
    tok = processor.tokenizer
    image, turns = shapes.conversation("train", 5, describe=True)
    assert turns[-1][0] == shapes.DESCRIBE and len({q for q, _ in turns[:-1]}) == len(turns) - 1
    qs, ans = [q for q, _ in turns], [a for _, a in turns]
    batch = make_batch(processor, [image], [qs], [ans])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    first = processor(images=[image], text=[prompt_text(processor, qs[0])], return_tensors="pt")["input_ids"][0]
    assert ids[: len(first)].tolist() == first.tolist()
    want = [t for a in ans for t in tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert labels[labels != -100].tolist() == want


def test_sincos_init_gives_patches_distinct_positions():
    from tokensieve.train import build_model

    model, _ = build_model(TrainConfig(**TOY))
    table = model.model.vision_tower.embeddings.position_embedding.weight[1:]
    dist = torch.cdist(table, table) + torch.eye(len(table)) * 1e3
    assert dist.min() > 0.05  # every patch position is told apart at initialisation
    plain, _ = build_model(TrainConfig(**TOY, sincos_positions=0))
    assert plain.model.vision_tower.embeddings.position_embedding.weight[1:].std() < 0.05


def test_patch_targets_agree_with_the_pixels():
    """Each patch's colour / digit target is re-derived from the rendered image alone, for 30 scenes."""
    import numpy as np

    from tokensieve.data import shapes
    from tokensieve.train import AUX_COLOURS, AUX_SHAPES, _per_patch, scene_targets

    seen_tiny = 0
    for i in range(30):
        image, _, scene = shapes.conversation("train", i, with_scene=True)
        t = scene_targets(scene, 8)
        cells = _per_patch(np.asarray(image).astype(np.int32), 8)  # [P, 64, 3]
        for obj in scene.objects:
            rgb = np.array(shapes.COLOURS[obj.colour])
            count = (cells == rgb).all(-1).sum(1)
            mine = t[0] == AUX_COLOURS.index(obj.colour) + 1
            assert mine.any(), f"scene {i}: the {obj.size} px {obj.colour} {obj.shape} labels no patch"
            assert (count[mine.numpy()] >= 4).all()
            assert (t[1][mine] == AUX_SHAPES.index(obj.shape) + 1).all()
            seen_tiny += obj.size < shapes.SHAPE_MIN
        ink = (cells == np.array(shapes.INK[scene.digit_ink])).all(-1).sum(1)
        digit = t[2] > 0
        assert (t[2][digit] == scene.digit + 1).all() and (ink[digit.numpy()] >= 4).all()
        plain = ~(t > 0).any(0)
        saturated = np.zeros(len(cells), dtype=int)
        for rgb in shapes.COLOURS.values():
            saturated += (cells == np.array(rgb)).all(-1).sum(1)
        assert (saturated[plain.numpy()] < 4).all() and (ink[plain.numpy()] < 4).all()
    assert seen_tiny >= 5


def test_easyvqa_targets_mark_the_shape_and_ignore_what_the_questions_do_not_name():
    from PIL import Image, ImageDraw

    from tokensieve.train import AUX_COLOURS, AUX_SHAPES, IGNORE, easyvqa_targets

    img = Image.new("RGB", (64, 64), (240, 235, 230))
    ImageDraw.Draw(img).rectangle((0, 0, 31, 31), fill=(0, 0, 255))  # the top-left quarter
    t = easyvqa_targets(img, "blue", "rectangle", size=96, patch=8)
    grid = t.view(3, 12, 12)
    assert (grid[0, :6, :6] == AUX_COLOURS.index("blue") + 1).all() and (grid[0, 6:, :] == 0).all()
    assert (grid[1, :6, :6] == AUX_SHAPES.index("rectangle") + 1).all() and (grid[2] == 0).all()
    unknown = easyvqa_targets(img, None, "rectangle", size=96, patch=8).view(3, 12, 12)
    assert (unknown[0, :6, :6] == IGNORE).all() and (unknown[0, 6:, :] == 0).all()


def test_the_patch_probe_trains_and_leaves_no_hook_on_the_model():
    def hooks(model):  # transformers installs some of its own; the probe must add none that outlive training
        return {name: len(m._forward_hooks) for name, m in model.named_modules() if m._forward_hooks}

    before = torch.get_num_threads()
    model, _, history = train(TrainConfig(**{**TOY, "aux_weight": 1.0, "steps": 8}), log=lambda m: None)
    plain, _, _ = train(TrainConfig(**{**TOY, "steps": 1}), log=lambda m: None)
    torch.set_num_threads(before)
    aux = [h["aux_loss"] for h in history]
    assert aux[-1] < aux[0]
    assert hooks(model) == hooks(plain)
    assert not any("head" in name for name, _ in model.named_parameters())  # the probe is not part of the model
