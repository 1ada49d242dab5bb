"""The model card: what a trained model folder says about how it was made and how well it answers.

It lives with the trainer because it reads the run's ``training.json`` (the :class:`TrainConfig` options a run
switched on get their own lines) and only ``training/train_default.py`` writes it. Its accuracy comes from the code
``tokensieve eval`` uses (:func:`tools.evaluate.predict`), so the card states what an evaluation of the full-token
model would: that dependency points from the trainer to the tools, never back.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..models.loading import load_model
from ..tools.evaluate import predict
from ..tools.records import _accuracy


def _recipe_lines(cfg: dict) -> str:
    """The card's bullet points for the training-only supervision a config switched on."""
    lines = []
    if cfg.get("aux_weight"):
        heads = "colour, shape, digit" + (" and quadrant" if cfg.get("aux_quadrant") else "")
        lines.append(
            "- A per-patch probe (a linear layer on the feature layer's patch states, weight "
            f"{cfg['aux_weight']}) learns the "
            f"{heads}\n  each patch shows (targets drawn from the scene; for easy-VQA from the image's own answers)"
            + (
                ". Each head's loss averages the patches that show something and those that show\n  nothing "
                "separately, so a digit on 3 of 144 patches weighs as much as the background"
                if cfg.get("aux_balance")
                else ""
            )
            + ". The probe is training-only and not part of the saved model."
        )
    if cfg.get("aux_weight") and (cfg.get("aux_pooled") or cfg.get("aux_mask")):
        extra = (
            ["per object and per digit, the colour / shape / digit logits averaged over the instance's patches"]
            if cfg.get("aux_pooled")
            else []
        )
        extra += ["which sub-cells of each patch are drawn"] if cfg.get("aux_mask") else []
        lines.append("- The probe also learns " + "; and ".join(extra) + ".")
    sheets = "training sheets (3-8 digits and 3-8 shapes anywhere on a scene background)"
    if cfg.get("vision_steps"):
        lines.append(
            f"- {cfg['vision_steps']} steps before the main schedule train the vision tower and probe alone"
            + (" against the teacher's features, on training images" if cfg.get("distill_from") else f" on {sheets}")
            + (f"; every main step adds {cfg['sheets']} sheets for the probe" if cfg.get("sheets") else "")
            + "."
        )
    elif cfg.get("sheets"):
        lines.append(f"- Every step adds {cfg['sheets']} {sheets} for the probe.")
    if cfg.get("aux_words"):
        lines.append(
            f"- A word-alignment loss (weight {cfg['aux_words']}): each patch's projector output, scored "
            "against the LM's own embeddings of the colour,\n  shape, row (top / bottom) and column "
            "(left / right) words, names what the patch shows and where it is. Training-only."
        )
    if cfg.get("question_first"):
        lines.append(
            "- The chat template puts the question before the image (`user : QUESTION <image> assistant : `),"
            " so the visual\n  tokens read the question; `processor.apply_chat_template` writes this order "
            "whatever the order of the content list."
        )
    drill = []
    if cfg.get("where_questions"):
        drill.append('"where is the <colour> shape?" for every object')
    if cfg.get("extra_relations"):
        drill.append(f"{cfg['extra_relations']} more relation question(s)")
    if cfg.get("extra_exists"):
        drill.append(f"{cfg['extra_exists']} more existence question(s)")
    if drill:
        lines.append(
            "- Shapes conversations also carry training-only drill turns after the family questions: "
            + ", ".join(drill)
            + "."
        )
    if cfg.get("lead_families"):
        lines.append(
            "- Each shapes conversation opens with a question drawn from: "
            + ", ".join(f for f in cfg["lead_families"].split(",") if f)
            + " (the evaluation prompt's place); its other turns follow."
        )
    if cfg.get("aux_attention"):
        at = [a for a in cfg.get("attention_at", "word").split(",") if a]
        what = {
            "word": "in LM layers 0-1, a question's colour / shape / digit / quadrant words attend to the "
            "patches they name",
            "answer": f"in LM layer {cfg.get('attention_layer', 2)}, each position that predicts an answer "
            "word attends to the patches the question names",
            "route": f"in LM layer {cfg.get('attention_layer', 2)}, each position that predicts an answer "
            "word attends to the question words that name what is asked about",
        }
        lines.append(
            f"- An attention guide (weight {cfg['aux_attention']}, loss `-log` of the attention mass on "
            "the named keys, training-only): " + "; ".join(what[a] for a in at) + "."
        )
    if cfg.get("init_from"):
        lines.append(
            f"- Weights start from `{cfg['init_from']}` (tensors of equal shape copied; CLIP's position table "
            "resampled to the new grid and the patch kernel resized, as when a ViT moves to a higher "
            "resolution), not from random values."
        )
    if cfg.get("distill_from"):
        lines.append(
            f"- The vision tower also learns to reproduce the feature layer of `{cfg['distill_from']}` "
            f"(its grid resized to this one's; weight {cfg.get('distill_weight', 1.0)}) on every image it sees."
        )
    return "\n".join(lines) + ("\n" if lines else "")


def write_model_card(model_dir: str | Path, batch_size: int = 64, name: str = "default model") -> str:
    """Measure the full-token model on both test sets and write its README.md (the model card)."""
    from .. import data as datasets

    model_dir = Path(model_dir)
    model, processor = load_model(model_dir)
    info = json.loads((model_dir / "training.json").read_text())
    cfg = info["config"]
    rows = []
    for data in ("shapes", "easyvqa"):
        samples = datasets.load(data, "test")
        pred = predict(model, processor, samples, batch_size=batch_size)
        acc, fam = _accuracy(pred.answers, samples)
        counts = defaultdict(int)
        for s in samples:
            counts[s.family] += 1
        fam_text = ", ".join(f"{f} {100 * a:.1f}% (n={counts[f]})" for f, a in fam.items())
        rows.append(f"| {data} test | {len(samples)} | {100 * acc:.1f}% | {fam_text} |")
    params = sum(p.numel() for p in model.parameters())
    notes = cfg.get("notes", {})
    side = cfg["image_size"] // cfg["patch_size"]
    load = (
        f" The machine was shared: mean 1-minute load average {notes['mean_load']} on its {notes.get('cores', '?')} "
        "cores while it trained, so an idle machine is faster."
        if notes.get("mean_load")
        else ""
    )
    command = f"\n\n    {notes['command']}\n" if notes.get("command") else ""
    curriculum = (
        f"- The first {cfg['curriculum_steps']} steps use easy-VQA images only.\n"
        if cfg.get("curriculum_steps")
        else ""
    )
    card = f"""# tokensieve {name}

A small LLaVA-1.5-layout VLM trained on CPU by `training/train_default.py` as one of tokensieve's embedded
accuracy yardsticks. Stock `LlavaForConditionalGeneration`: CLIP vision tower ({cfg["vision_layers"]} layers,
width {cfg["vision_width"]}, {cfg["image_size"]} px, patch {cfg["patch_size"]}: {side}x{side} = {side * side}
visual tokens + CLS, features from layer -2), 2-layer GELU projector, Llama LM ({cfg["text_layers"]} layers, width
{cfg["text_width"]}), word-level tokenizer. {params / 1e6:.2f} M parameters, fp32.

Not a general model: it answers one-word questions about the two datasets below, and nothing else.

## Data
- `tokensieve.data.shapes` train split (procedural scenes, a fresh scene per sample), {100 * (1 - cfg["easyvqa_share"]):.0f}% of samples.
- easy-VQA train split (PyPI `easy-vqa`, MIT, 38,575 questions on 4,000 images), {100 * cfg["easyvqa_share"]:.0f}% of samples.
- Each training image carries up to {cfg.get("turns", 1)} of its questions as a conversation (shapes: one per
  family; easy-VQA: the image's own questions); the first turn is exactly the evaluation prompt.
{curriculum}- {100 * cfg.get("describe_share", 0):.0f}% of images also end with a "describe the image ." turn whose answer lists every object (position,
  size, colour, shape), the count and the digit (for easy-VQA: colour and shape, from the image's own answers).
  The test sets contain only the question families; the shapes test split is never trained on.
{_recipe_lines(cfg)}
## Training
{notes.get("steps_done", cfg["steps"])} steps x batch {cfg["batch_size"]}, AdamW (lr {cfg["lr"]}, cosine to {cfg["min_lr"]},
warmup {cfg["warmup"]}, weight decay {cfg["weight_decay"]}), loss on the answer words and EOS only, seed {cfg["seed"]};
CLIP's learned position table starts from a 2-D sine-cosine grid{"" if cfg.get("sincos_positions", 0) else " (off in this run)"}.
{notes.get("train_minutes", "?")} minutes of training on {notes.get("threads", "?")} CPU thread(s) ({notes.get("device", "cpu")},
torch {notes.get("torch", "?")}).{load} Loss and probe accuracy history in `training.json`. Command:{command}
## Test accuracy (full tokens, greedy `generate()`, exact match)

| set | questions | accuracy | per family |
|---|---|---|---|
{chr(10).join(rows)}
"""  # noqa: E501 (the card's text, one markdown line per source line)
    old = model_dir / "README.md"
    kept = old.read_text().partition(REPRODUCE)[2] if old.is_file() else ""
    if kept:  # a hand-written section (how the weights it started from were made) survives re-measuring
        card = card.rstrip("\n") + "\n\n" + REPRODUCE + kept
    old.write_text(card)
    return card


REPRODUCE = "## Reproduce\n"
"""A model card section that :func:`write_model_card` keeps when it rewrites the card."""
