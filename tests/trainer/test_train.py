"""A few steps of the real training loop at toy sizes: it learns, saves, and the saved folder loads offline."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tokensieve.trainer import Mixture, TrainConfig, make_batch, save, train

TOY = dict(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    vision_mlp=64,
    text_width=32,
    text_layers=1,
    text_heads=2,
    text_kv_heads=2,
    text_mlp=64,
    batch_size=8,
    steps=12,
    warmup=2,
    lr=3e-3,
    log_every=1,
    threads=1,
)


@pytest.mark.slow
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
    from tokensieve.trainer import build_model

    _, processor = build_model(cfg)
    batch = make_batch(processor, *Mixture(cfg).draw(4))
    labelled = batch["labels"] != -100
    assert labelled.sum().item() == 8 and labelled[:, -2:].all()
    assert (batch["labels"][:, -1] == processor.tokenizer.eos_token_id).all()


def test_multi_word_answers_are_labelled_whole_and_rows_stay_left_padded():
    from tokensieve.data import shapes
    from tokensieve.trainer import build_model

    _, processor = build_model(TrainConfig(**TOY))
    tok = processor.tokenizer
    a, b = shapes.sample("train", 3, "describe"), shapes.sample("train", 4, "count")
    batch = make_batch(processor, [a.image, b.image], [a.question, b.question], [a.answer, b.answer])
    for row, s in enumerate((a, b)):
        want = tok(s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = batch["labels"][row]
        assert labels[labels != -100].tolist() == want
        assert batch["input_ids"][row, -len(want) :].tolist() == want  # answers end every row
        mask = batch["attention_mask"][row]
        assert mask[-1] == 1 and (mask.cumsum(0) > 0).sum() == mask.sum()  # padding only on the left
    assert len(want) == 2 and (batch["labels"][0] != -100).sum() > 10


def test_a_conversation_starts_with_the_eval_prompt_and_labels_every_answer():
    from tokensieve.data import shapes
    from tokensieve.trainer import build_model, prompt_text

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
    from tokensieve.trainer import build_model

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
    from tokensieve.trainer import AUX_COLOURS, AUX_SHAPES, IGNORE, _per_patch, scene_targets

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
            shape = AUX_SHAPES.index(obj.shape) + 1 if obj.size >= shapes.SHAPE_MIN else IGNORE
            assert (t[1][mine] == shape).all()
            seen_tiny += obj.size < shapes.SHAPE_MIN
        ink = (cells == np.array(shapes.INK[scene.digit_ink])).all(-1).sum(1)
        digit = t[2] > 0
        assert (t[2][digit] == scene.digit + 1).all() and (ink[digit.numpy()] >= 4).all()
        plain = ~(t[:3] != 0).any(0)
        saturated = np.zeros(len(cells), dtype=int)
        for rgb in shapes.COLOURS.values():
            saturated += (cells == np.array(rgb)).all(-1).sum(1)
        assert (saturated[plain.numpy()] < 4).all() and (ink[plain.numpy()] < 4).all()
    assert seen_tiny >= 5


def test_easyvqa_targets_mark_the_shape_and_ignore_what_the_questions_do_not_name():
    from PIL import Image, ImageDraw

    from tokensieve.trainer import AUX_COLOURS, AUX_SHAPES, IGNORE, easyvqa_targets

    img = Image.new("RGB", (64, 64), (240, 235, 230))
    ImageDraw.Draw(img).rectangle((0, 0, 31, 31), fill=(0, 0, 255))  # the top-left quarter
    t = easyvqa_targets(img, "blue", "rectangle", size=96, patch=8)
    grid = t[:5].view(5, 12, 12)
    assert (grid[0, :6, :6] == AUX_COLOURS.index("blue") + 1).all() and (grid[0, 6:, :] == 0).all()
    assert (grid[1, :6, :6] == AUX_SHAPES.index("rectangle") + 1).all() and (grid[2] == 0).all()
    assert (grid[3] == (grid[0] > 0)).all() and (grid[4] == 0).all()  # one object, no digit
    unknown = easyvqa_targets(img, None, "rectangle", size=96, patch=8)[:5].view(5, 12, 12)
    assert (unknown[0, :6, :6] == IGNORE).all() and (unknown[0, 6:, :] == 0).all()


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    """Stop after 3 of 2 + 6 steps (state saved), start again from the state: bit-identical to one go."""
    cfg = dict(
        TOY,
        steps=6,
        aux_weight=1.0,
        aux_balance=1,
        aux_quadrant=1,
        aux_pooled=1,
        where_questions=1,
        extra_relations=1,
        sheets=2,
        vision_steps=2,
        aux_mask=1,
    )
    before = torch.get_num_threads()
    whole, _, hist_whole = train(TrainConfig(**cfg), log=lambda m: None)
    part, _, _ = train(TrainConfig(**cfg), log=lambda m: None, state_dir=tmp_path, stop_at_step=3)
    assert (tmp_path / "state.pt").is_file()
    resumed, _, hist_resumed = train(TrainConfig(**cfg), log=lambda m: None, state_dir=tmp_path)
    torch.set_num_threads(before)
    a, b, c = whole.state_dict(), resumed.state_dict(), part.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the first part really stopped early
    assert [h["loss"] for h in hist_resumed] == [h["loss"] for h in hist_whole]
    with pytest.raises(ValueError, match="another config.*lr"):
        train(TrainConfig(**{**cfg, "lr": 1e-2}), log=lambda m: None, state_dir=tmp_path)


def test_drill_turns_come_from_their_own_stream_and_answer_from_the_scene():
    """Drill turns leave the conversation (and so the test set's generator) untouched; "where" names the quadrant."""
    from tokensieve.data import shapes

    for i in range(20):
        image, turns, scene = shapes.conversation("train", i, describe=True, with_scene=True)
        again = shapes.conversation("train", i, describe=True, with_scene=True)
        drill = shapes.drill("train", i, scene, where=True, relations=2, exists=1)
        assert again[1] == turns and drill == shapes.drill("train", i, scene, where=True, relations=2, exists=1)
        where = {q: a for q, a in drill if q.startswith("where")}
        assert where == {f"where is the {o.colour} shape?": shapes.quadrant(o) for o in scene.objects}
        relations = [q for q, _ in drill if " shape " in q and q.startswith("is the")]
        assert len(relations) == (2 if len(scene.objects) >= 2 else 0)
        assert sum(q.startswith("is there") for q, _ in drill) == 1


def test_quadrant_targets_match_the_shapes_quadrants():
    from tokensieve.data import shapes
    from tokensieve.trainer import quadrant_targets

    for side in (12, 24):
        q = quadrant_targets(side).view(side, side)
        cell = shapes.IMAGE_SIZE / side
        for r in range(side):
            for c in range(side):
                centre = shapes.Obj(
                    "square", "red", (int(c * cell), int(r * cell), int((c + 1) * cell) - 1, int((r + 1) * cell) - 1)
                )
                assert shapes.QUADRANTS[q[r, c] - 1] == shapes.quadrant(centre)


def test_balanced_probe_weighs_rare_patches_like_the_background():
    """A probe sure of "no digit" everywhere, on a digit covering 2 of 16 patches: the balanced loss charges half the
    digit head's loss to those two patches, the plain mean 2/16."""
    from tokensieve.trainer import PatchProbe, build_model

    cfg = TrainConfig(**TOY, aux_weight=1.0)
    model, _ = build_model(cfg)
    targets = torch.zeros(1, 5, 16, dtype=torch.long)
    targets[0, 2, :2] = 5  # the digit head: two patches show a 4
    losses = {}
    for balance in (0, 1):
        probe = PatchProbe(model, TrainConfig(**TOY, aux_weight=1.0, aux_balance=balance))
        probe.states = torch.zeros(1, 17, cfg.vision_width)
        with torch.no_grad():
            probe.head.weight.zero_()
            probe.head.bias.zero_()
            start = 0
            for n in probe.heads.values():  # every head: class 0 ("nothing here") by a margin of 20
                probe.head.bias[start] = 20.0
                start += n
        losses[balance] = probe.loss(targets).item()
        probe.remove()
    heads = 3
    assert losses[0] == pytest.approx(20 * 2 / 16 / heads, rel=1e-3)
    assert losses[1] == pytest.approx(20 / 2 / heads, rel=1e-3)


def test_sheet_targets_agree_with_the_pixels():
    """Every digit and shape on a training sheet labels patches that really show it (re-read from the image)."""
    import numpy as np

    from tokensieve.data import shapes
    from tokensieve.trainer import AUX_COLOURS, TARGET_ROWS, _per_patch, sheet_targets

    digits_seen = 0
    for i in range(20):
        sheet = shapes.sheet("train", i)
        t = sheet_targets(sheet, 8)
        cells = _per_patch(np.asarray(sheet.image).astype(np.int32), 8)
        for j, (digit, ink, _) in enumerate(sheet.digits):
            mine = (t[TARGET_ROWS["digit_instance"]] == j + 1).numpy()
            assert mine.any() and (t[TARGET_ROWS["digit"]][mine] == digit + 1).all()
            assert ((cells[mine] == np.array(shapes.INK[ink])).all(-1).sum(1) >= 4).all()
            digits_seen += 1
        for k, o in enumerate(sheet.objects):
            mine = (t[TARGET_ROWS["object"]] == k + 1).numpy()
            assert (t[TARGET_ROWS["colour"]][mine] == AUX_COLOURS.index(o.colour) + 1).all()
            assert ((cells[mine] == np.array(shapes.COLOURS[o.colour])).all(-1).sum(1) >= 4).all()
    assert digits_seen >= 20 * 3


def test_pooled_probe_loss_reads_an_instance_from_all_its_patches():
    """Per instance the probe's logits are averaged over its patches: two patches that disagree still name the
    digit when one of them is sure."""
    from tokensieve.trainer import TARGET_ROWS, PatchProbe, build_model

    cfg = TrainConfig(**TOY, aux_weight=1.0, aux_pooled=1)
    model, _ = build_model(cfg)
    probe = PatchProbe(model, cfg)
    probe.remove()
    part = torch.zeros(1, 4, 11)
    part[0, 0, 5] = 8.0  # patch 0: sure it is a 4
    part[0, 1, 6] = 1.0  # patch 1: leans to 5
    which = torch.tensor([[1, 1, 0, 2]])
    labels = torch.tensor([[5, 5, 0, 8]])
    logits, label = probe._instances(part, labels, which)
    assert label.tolist() == [[5, 8]]
    torch.testing.assert_close(logits[0, 0], (part[0, 0] + part[0, 1]) / 2)
    assert logits[0, 0].argmax() == 5 and TARGET_ROWS["digit_instance"] == 4


def test_warm_start_copies_weights_and_resizes_the_grid(tmp_path):
    """A model started from a saved one at another image / patch size: equal tensors copied, the position grid
    resampled (a constant table stays constant) and the patch kernel scaled so a flat colour embeds the same."""
    from tokensieve.trainer import build_model, warm_start

    small, _ = build_model(TrainConfig(**TOY))
    small.save_pretrained(tmp_path)
    big, _ = build_model(TrainConfig(**{**TOY, "image_size": 84, "patch_size": 14, "seed": 1}))
    resized = warm_start(big, tmp_path)
    assert sorted(r.rsplit(".", 2)[-2] for r in resized) == ["patch_embedding", "position_embedding"]
    a, b = small.state_dict(), big.state_dict()
    same = [k for k in a if a[k].shape == b[k].shape]
    assert len(same) == len(a) - 2 and all(torch.equal(a[k], b[k]) for k in same)
    flat = torch.ones(1, 3, 84, 84)
    emb_small = small.model.vision_tower.embeddings.patch_embedding(torch.ones(1, 3, 32, 32))
    emb_big = big.model.vision_tower.embeddings.patch_embedding(flat)
    torch.testing.assert_close(emb_big.mean((2, 3)), emb_small.mean((2, 3)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cannot start from"):
        warm_start(build_model(TrainConfig(**{**TOY, "text_width": 48}))[0], tmp_path)


def test_mask_targets_mark_the_drawn_sub_cells_whatever_their_colour():
    """Each 2 x 2-pixel sub-cell of each patch is 1 exactly when at least 2 of its pixels are not background grey."""
    import numpy as np

    from tokensieve.data import shapes
    from tokensieve.trainer import TARGET_ROWS, mask_side, scene_targets

    assert mask_side(8, 96) == 4 and mask_side(14, 336) == 2
    for i in range(10):
        image, _, scene = shapes.conversation("train", i, with_scene=True)
        px = np.asarray(image).astype(int)
        grey = (px[..., 0] == px[..., 1]) & (px[..., 1] == px[..., 2]) & (px[..., 0] > 0) & (px[..., 0] < 255)
        drawn = (~grey).reshape(48, 2, 48, 2).sum((1, 3)) >= 2  # [48, 48] sub-cells
        want = drawn.reshape(12, 4, 12, 4).transpose(0, 2, 1, 3).reshape(144, 16).T
        t = scene_targets(scene, 8)[TARGET_ROWS["mask"] :]
        assert t.shape == (16, 144) and (t.numpy() == want).all()


def test_a_student_started_from_its_teacher_has_zero_distillation_loss(tmp_path):
    """Same weights, same grid: the feature layer equals the teacher's; on a finer grid the target is the teacher's
    grid resized, one row per student patch plus [CLS]."""
    from tokensieve.data import shapes
    from tokensieve.trainer import PatchProbe, Teacher, build_model, warm_start

    cfg = TrainConfig(**TOY, aux_weight=1.0)
    teacher_model, processor = build_model(cfg)
    teacher_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    images = [shapes.sample("train", i).image for i in range(3)]
    student, _ = build_model(TrainConfig(**{**TOY, "seed": 5}))
    warm_start(student, tmp_path)
    probe = PatchProbe(student, cfg)
    student.model.vision_tower(processor.image_processor(images, return_tensors="pt")["pixel_values"])
    assert Teacher(tmp_path, student).loss(images, probe.states).item() == pytest.approx(0.0, abs=1e-10)
    probe.remove()
    finer, _ = build_model(TrainConfig(**{**TOY, "image_size": 64}))
    target = Teacher(tmp_path, finer).features(images)
    assert target.shape == (3, 1 + 8 * 8, TOY["vision_width"])
    grid = target[:, 1:].reshape(3, 8, 8, -1)
    torch.testing.assert_close(grid[:, 0, 0], grid[:, 1, 1])  # each teacher patch fills a 2 x 2 block


def test_word_loss_scores_patches_against_the_lms_own_word_embeddings():
    """The word loss is a cross-entropy of projector outputs against the tied embedding rows of the target words:
    a projected patch equal to the embedding of "red" + "top" + "left" is named red, top and left."""
    from tokensieve.trainer import AUX_COLOURS, TARGET_ROWS, WORD_TARGETS, PatchProbe, build_model

    cfg = TrainConfig(**TOY, aux_weight=1.0, aux_quadrant=1, aux_words=1.0)
    model, processor = build_model(cfg)
    probe = PatchProbe(model, cfg, processor.tokenizer)
    assert not any(p is model.get_input_embeddings().weight for p in probe.parameters())  # not trained twice
    table = model.get_input_embeddings().weight.detach()
    tok = processor.tokenizer
    row = lambda w: table[tok.convert_tokens_to_ids(w)]  # noqa: E731
    patches = (cfg.image_size // cfg.patch_size) ** 2
    targets = torch.zeros(1, 7, patches, dtype=torch.long)
    targets[0, TARGET_ROWS["quadrant"]] = 1  # every patch "top left"
    targets[0, TARGET_ROWS["colour"], 0] = AUX_COLOURS.index("red") + 1  # patch 0 shows a red object
    targets[0, TARGET_ROWS["shape"]] = -100  # no shape known
    torch.manual_seed(0)
    probe.projected = torch.randn(1, patches, table.shape[1])
    f = probe.projected[0]
    ids = lambda words: torch.tensor(tok.convert_tokens_to_ids(list(words)))  # noqa: E731
    ce = torch.nn.functional.cross_entropy
    expected = (
        ce(f[:1] @ table[ids(AUX_COLOURS)].T, torch.tensor([AUX_COLOURS.index("red")]))
        + ce(f @ table[ids(["top", "bottom"])].T, torch.zeros(patches, dtype=torch.long))
        + ce(f @ table[ids(["left", "right"])].T, torch.zeros(patches, dtype=torch.long))
    ) / 3
    torch.testing.assert_close(probe.word_loss(targets), expected)  # shape: no known patch, no term
    assert set(WORD_TARGETS) == {"colour", "shape", "row", "column"}
    aligned = row("red") + row("top") + row("left")
    probe.projected = (50 * aligned / aligned.norm()).expand(1, patches, -1).clone()
    good = probe.word_loss(targets)
    probe.projected = -probe.projected
    assert good < probe.word_loss(targets)
    probe.remove()
    with pytest.raises(ValueError, match="tokenizer"):
        PatchProbe(model, cfg)


@pytest.mark.slow
def test_word_loss_trains_and_leaves_no_hook_on_the_projector():
    before = torch.get_num_threads()
    model, _, history = train(
        TrainConfig(**{**TOY, "aux_weight": 1.0, "aux_words": 1.0, "steps": 8}), log=lambda m: None
    )
    torch.set_num_threads(before)
    words = [h["word_loss"] for h in history]
    assert words[-1] < words[0]
    assert not model.model.multi_modal_projector._forward_hooks
    with pytest.raises(ValueError, match="aux_words needs the probe"):
        train(TrainConfig(**{**TOY, "aux_words": 1.0, "steps": 1}), log=lambda m: None)


def test_question_first_template_puts_the_question_before_the_image_in_eval_and_training():
    from PIL import Image

    from tokensieve.trainer import build_model, prompt_text

    cfg = TrainConfig(**TOY, question_first=1)
    _, processor = build_model(cfg)
    assert (
        prompt_text(processor, "how many shapes are there?") == "user : how many shapes are there? <image> assistant : "
    )
    # whatever the order of the content list, the text comes first
    messages = [{"role": "user", "content": [{"type": "text", "text": "q ?"}, {"type": "image"}]}]
    assert (
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        == "user : q ? <image> assistant : "
    )
    batch = make_batch(
        processor,
        [Image.new("RGB", (32, 32))],
        [["how many shapes are there?", "what digit is written?"]],
        [["2", "7"]],
    )
    words = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    first_image = words.index("<image>")
    assert words[:first_image] == ["user", ":", "how", "many", "shapes", "are", "there", "?"]
    # later turns follow the image as before
    assert words[-11:] == ["user", ":", "what", "digit", "is", "written", "?", "assistant", ":", "7", "</s>"]
    _, plain = build_model(TrainConfig(**TOY))
    assert prompt_text(plain, "q ?") == "user : <image> q ? assistant : "


def test_lead_families_open_every_shapes_conversation_and_skip_scenes_they_do_not_fit():
    from tokensieve.data import shapes

    cfg = TrainConfig(**TOY, lead_families="relation", turns=2, easyvqa_share=0.0, describe_share=0.0)
    data = Mixture(cfg)
    _, questions, answers = data.draw(12)
    for index, (qs, ans) in enumerate(zip(questions, answers)):
        _, turns, scene = shapes.conversation("train", index, with_scene=True)
        if len(scene.objects) >= 2:
            assert " of the " in qs[0] or " above " in qs[0] or " below " in qs[0], qs[0]
            assert ans[0] in ("yes", "no")
            assert list(zip(qs[1:], ans[1:])) == turns[:1]
        else:  # a one-shape scene has no relation to open with: its conversation is unchanged
            assert list(zip(qs, ans)) == turns[:2]


@pytest.mark.parametrize("at", ["word", "answer", "route"])
def test_attention_guide_supervises_what_the_question_names_and_matches_eager_attention(at):
    """The guide's mass for each supervised query equals what eager attention gives that layer / head / position
    over the named patches, and the named patches are those the scene's targets give the question's words."""
    from tokensieve.trainer import AUX_COLOURS, AUX_SHAPES, TARGET_ROWS, AttentionGuide, build_model

    cfg = TrainConfig(
        **{**TOY, "text_layers": 2, "text_heads": 4, "text_kv_heads": 2},
        easyvqa_share=0.0,
        where_questions=1,
        describe_share=0.0,
    )
    model, processor = build_model(cfg)
    model.set_attn_implementation("eager")
    *drawn, targets = Mixture(cfg).draw_with_targets(4)
    batch = make_batch(processor, *drawn)
    guide = AttentionGuide(model, processor.tokenizer, at=at, layer=1)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        loss = guide.loss(batch, targets)
    items = guide.items(batch["input_ids"], batch["labels"], batch["attention_mask"], targets)
    tok = processor.tokenizer
    word = lambda b, p: tok.convert_ids_to_tokens(int(batch["input_ids"][b, p]))  # noqa: E731
    image_pos = (batch["input_ids"] == model.config.image_token_id).nonzero()[:, 1].view(4, -1)
    patches = lambda b, keys: torch.isin(image_pos[b], keys)  # noqa: E731
    colour_of = lambda b, named: {AUX_COLOURS[int(c) - 1] for c in targets[b, TARGET_ROWS["colour"], named]}  # noqa: E731
    expected, seen = [], set()
    for b, p, layer, head, keys in items:
        named = patches(b, keys)
        w = word(b, p)
        if at == "word":
            assert batch["labels"][b, p] == -100  # a question word, never an answer
        if at == "word" and w in AUX_COLOURS:
            assert (layer, head) == (0, 0)
            assert torch.equal(named, targets[b, TARGET_ROWS["colour"]] == AUX_COLOURS.index(w) + 1)
        if at == "word" and w in ("left", "right"):
            assert layer == 1 and (targets[b, TARGET_ROWS["object"], named] > 0).all()
        if at == "answer":
            # a position that predicts an answer word (a question's last token, or "top" of "top left")
            assert batch["labels"][b, p + 1] not in (-100, tok.eos_token_id) and layer == 1
            # "where is the <colour> shape?": head 0 looks at that object, whose quadrant is the answer
            question = [word(b, i) for i in range(p - 8, p)]
            if "where" in question and head == 0 and at == "answer":
                asked = question[question.index("where") + 3]
                assert colour_of(b, named) == {asked}
                seen.add("where")
        seen.add(w)
        if at == "route":  # heads 2 / 3 read the question's word for what heads 0 / 1 of "answer" read
            assert head in (2, 3) and len(keys) == 1 and keys[0] < p and not named.any()
            w_key = word(b, int(keys[0]))
            assert w_key in AUX_COLOURS or w_key in ("left", "right", "digit") or w_key in AUX_SHAPES
            seen.add("route")
        expected.append(-out.attentions[layer][b, head, p, keys].sum().log())
    assert {
        "word": lambda: {"left", "right"} & seen and set(AUX_COLOURS) & seen,
        "answer": lambda: "where" in seen,
        "route": lambda: "route" in seen,
    }[at]()
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    ids = {h.id for h in guide.handles}
    assert ids <= {i for layer in model.model.language_model.layers for i in layer.self_attn._forward_hooks}
    guide.remove()
    assert not ids & {i for layer in model.model.language_model.layers for i in layer.self_attn._forward_hooks}


@pytest.mark.slow
def test_attention_guide_raises_the_mass_it_supervises_and_needs_the_layers_it_guides():
    before = torch.get_num_threads()
    cfg = {**TOY, "text_layers": 2, "text_heads": 4, "steps": 15, "aux_attention": 10.0, "where_questions": 1}
    model, _, history = train(TrainConfig(**cfg), log=lambda m: None)
    torch.set_num_threads(before)
    masses = [h["attention_mass"] for h in history]
    assert sum(masses[-3:]) > sum(masses[:3])
    assert not any(layer.self_attn._forward_hooks for layer in model.model.language_model.layers)
    with pytest.raises(ValueError, match="needs LM layer 1"):
        train(TrainConfig(**{**cfg, "text_layers": 1, "steps": 1}), log=lambda m: None)


def test_model_card_names_the_attention_guide_and_the_opening_families():
    from tokensieve.trainer.card import _recipe_lines

    card = _recipe_lines(
        {
            "aux_attention": 1.0,
            "attention_at": "word,route",
            "attention_layer": 2,
            "lead_families": "relation,exist,where",
        }
    )
    assert "attention guide (weight 1.0" in card and "layer 2" in card and "layers 0-1" in card
    assert "opens with a question drawn from: relation, exist, where" in card
    assert _recipe_lines({}) == ""


@pytest.mark.slow
def test_rewriting_a_model_card_keeps_its_reproduce_section_and_skips_steps_not_run(tmp_path, monkeypatch):
    """``--card-only`` re-measures a model; the hand-written "how the weights it started from were made" part stays,
    and a warm-started run without vision-only or curriculum steps does not claim "0 steps" of them."""
    import tokensieve.data as datasets
    from tokensieve.data import shapes
    from tokensieve.trainer.card import REPRODUCE, write_model_card

    cfg = TrainConfig(**{**TOY, "steps": 1, "sheets": 2, "aux_weight": 1.0})
    before = torch.get_num_threads()
    model, processor, history = train(cfg, log=lambda m: None)
    torch.set_num_threads(before)
    save(model, processor, tmp_path, cfg, history, "old card\n\n" + REPRODUCE + "\nStage one: run X first.\n")
    monkeypatch.setattr(datasets, "load", lambda data, split: [shapes.sample("test", i) for i in range(4)])
    card = write_model_card(tmp_path, batch_size=4)
    assert "old card" not in card and card.count(REPRODUCE) == 1 and card.endswith("Stage one: run X first.\n")
    assert "Every step adds 2 training sheets" in card
    assert "0 steps" not in card
    assert write_model_card(tmp_path, batch_size=4) == card  # stable on a second rewrite
