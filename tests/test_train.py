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
    cfg = TrainConfig(**TOY)
    from tokensieve.train import build_model

    _, processor = build_model(cfg)
    batch = make_batch(processor, *Mixture(cfg).draw(4))
    labelled = batch["labels"] != -100
    assert labelled.sum().item() == 8 and labelled[:, -2:].all()
    assert (batch["labels"][:, -1] == processor.tokenizer.eos_token_id).all()
