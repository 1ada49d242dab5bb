"""Accuracy retention: the full-token model once, then every method x budget on the same questions.

Batches are left-padded and decoded greedily; an answer is right when the generated text, stripped and lower-cased,
equals the reference word. ``loyalty`` is the share of answers identical to the full-token model's, right or wrong:
it separates "the method broke the model" from "the model was wrong anyway".
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .train import prompt_text

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
EMBEDDED_MODELS = {
    "default": DEFAULT_MODEL_DIR,  # 96 px, 8 px patches: 144 visual tokens
    "default-576": Path(__file__).parent / "default_model_576",  # LLaVA-1.5's shape: 336 px, 14 px patches, 576
}
"""The models shipped inside the package, by the name ``--model`` accepts."""


def model_path(model: str | Path | None = None) -> Path:
    """The directory of ``model``: an embedded model's name (:data:`EMBEDDED_MODELS`), a path, or None (default).

    A name wins over a relative folder of the same name; pass ``./default`` for such a folder.
    """
    if model is None:
        return DEFAULT_MODEL_DIR
    if isinstance(model, str) and model in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[model]
    return Path(model)


def load_model(path: str | Path | None = None):
    """``(model, processor)`` from ``path`` or an embedded model's name (default: ``default``); fp32, eval, offline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = model_path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (expected config.json there); embedded models: "
                                f"{', '.join(EMBEDDED_MODELS)}")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, processor


@dataclass
class Predictions:
    answers: list[str]
    kept_tokens: float
    """Mean visual tokens per image that the language model received."""
    tokens_in: float


def predict(model, processor, samples: Sequence, *, sieve=None, batch_size: int = 32, max_new_tokens: int = 3,
            advance: Callable[[int], None] | None = None) -> Predictions:
    """Greedy answers for ``samples`` (objects with ``image`` and ``question``), under ``sieve`` if given."""
    from contextlib import nullcontext

    image_token = model.config.image_token_id
    answers: list[str] = []
    kept = total = 0
    images = 0
    with torch.inference_mode(), (sieve(model) if sieve is not None else nullcontext()):
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            inputs = processor(images=[s.image for s in chunk], text=[prompt_text(processor, s.question) for s in chunk],
                               return_tensors="pt", padding=True)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answers += [a.strip().lower() for a in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                                           skip_special_tokens=True)]
            n_in = int((inputs["input_ids"] == image_token).sum())
            total += n_in
            if sieve is not None:  # in-LLM methods: the visual tokens averaged over decoder layers
                rep = sieve.last_report
                kept += sum(rep.llm_visual_tokens_avg) if rep.llm_visual_tokens_avg else rep.tokens_out
            else:
                kept += n_in
            images += len(chunk)
            if advance is not None:
                advance(len(chunk))
    return Predictions(answers, kept / max(images, 1), total / max(images, 1))


def _accuracy(answers, samples) -> tuple[float, dict[str, float]]:
    right = defaultdict(int)
    count = defaultdict(int)
    for a, s in zip(answers, samples):
        count[s.family] += 1
        right[s.family] += a == s.answer
    acc = sum(right.values()) / max(1, len(samples))
    return acc, {f: right[f] / count[f] for f in sorted(count)}


def evaluate(model, processor, samples: Sequence, methods: Sequence[str], budgets: Sequence, *,
             batch_size: int = 32, progress: bool = True, console=None, params: dict | None = None) -> list[dict]:
    """Records for the full-token model (method ``none``) and each method x budget, in that order.

    ``params`` maps a method name to its hyper-parameters (a 3-layer LM needs ``{"fastv": {"layer": 1}}``).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .session import Sieve

    params = params or {}
    sieves = [Sieve(m, b, **params.get(m, {})) for m in methods for b in budgets]  # bad input fails before any work
    runs = [(None, None)] + [(s, b) for s, b in zip(sieves, [b for _ in methods for b in budgets])]
    records = []
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("", total=len(runs) * len(samples))
        vanilla = None
        for sieve, budget in runs:
            bar.update(task, description="none (full tokens)" if sieve is None else f"{sieve.name} @ {budget}")
            pred = predict(model, processor, samples, sieve=sieve, batch_size=batch_size,
                           advance=lambda n: bar.advance(task, n))
            acc, fam = _accuracy(pred.answers, samples)
            if vanilla is None:
                vanilla = (pred.answers, acc)
            records.append({
                "method": "none" if sieve is None else sieve.name,
                "params": {} if sieve is None else params.get(sieve.name, {}),
                "budget": None if sieve is None else budget,
                "kept_tokens": round(pred.kept_tokens, 2),
                "tokens_in": round(pred.tokens_in, 2),
                "accuracy": acc,
                "relative": acc / vanilla[1] if vanilla[1] else None,
                "loyalty": sum(a == v for a, v in zip(pred.answers, vanilla[0])) / max(1, len(samples)),
                "families": fam,
                "questions": len(samples),
            })
    return records


def markdown_table(records: list[dict], title: str = "") -> str:
    fams = list(records[0]["families"]) if records else []
    head = ["method", "budget", "kept tokens", "accuracy", "relative", "loyalty"] + fams
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                      "|" + "---|" * len(head)]
    for r in records:
        cells = [r["method"], "-" if r["budget"] is None else str(r["budget"]), f"{r['kept_tokens']:.1f}",
                 f"{100 * r['accuracy']:.1f}", "-" if r["relative"] is None else f"{100 * r['relative']:.1f}%", f"{100 * r['loyalty']:.1f}%"]
        cells += [f"{100 * r['families'][f]:.1f}" for f in fams]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    by_method = defaultdict(list)
    for r in records:
        if r["method"] != "none":
            by_method[r["method"]].append((r["kept_tokens"], 100 * r["accuracy"]))
    for name, pts in sorted(by_method.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for r in records:
        if r["method"] == "none":
            ax.axhline(100 * r["accuracy"], color="black", linestyle="--", linewidth=1,
                       label=f"full ({r['kept_tokens']:.0f} tokens)")
            ax.plot([r["kept_tokens"]], [100 * r["accuracy"]], marker="*", color="black", markersize=10)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens kept per image")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(records: list[dict], out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``results.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    paths["json"].write_text(json.dumps(records, indent=1))
    paths["md"].write_text(markdown_table(records, title))
    plot(records, paths["png"], title)
    return paths


def run_eval(model_dir, data: str, methods: Sequence[str], budgets: Sequence, out_dir, *, limit=None,
             batch_size: int = 32, progress: bool = True, console=None, params: dict | None = None) -> list[dict]:
    """What ``tokensieve eval`` does: load, evaluate, write the three outputs."""
    from . import data as datasets
    from .session import Sieve

    for m in methods:  # validate before loading anything
        for b in budgets:
            Sieve(m, b, **(params or {}).get(m, {}))
    model, processor = load_model(model_dir)
    samples = datasets.load(data, "test", limit)
    records = evaluate(model, processor, samples, methods, budgets, batch_size=batch_size, progress=progress,
                       console=console, params=params)
    name = "default model" if model_dir is None else Path(model_dir).name
    write_outputs(records, out_dir, f"{data} test ({len(samples)} questions), {name}")
    return records


def _recipe_lines(cfg: dict) -> str:
    """The card's bullet points for the training-only supervision a config switched on."""
    lines = []
    if cfg.get("aux_weight"):
        heads = "colour, shape, digit" + (" and quadrant" if cfg.get("aux_quadrant") else "")
        lines.append(f"- A per-patch probe (a linear layer on the feature layer's patch states, weight {cfg['aux_weight']}) learns the "
                     f"{heads}\n  each patch shows (targets drawn from the scene; for easy-VQA from the image's own answers)"
                     + (". Each head's loss averages the patches that show something and those that show\n  nothing "
                        "separately, so a digit on 3 of 144 patches weighs as much as the background" if cfg.get("aux_balance") else "")
                     + ". The probe is training-only and not part of the saved model.")
    drill = []
    if cfg.get("where_questions"):
        drill.append('"where is the <colour> shape?" for every object')
    if cfg.get("extra_relations"):
        drill.append(f"{cfg['extra_relations']} more relation question(s)")
    if cfg.get("extra_exists"):
        drill.append(f"{cfg['extra_exists']} more existence question(s)")
    if drill:
        lines.append("- Shapes conversations also carry training-only drill turns after the family questions: "
                     + ", ".join(drill) + ".")
    if cfg.get("init_from"):
        lines.append(f"- Weights start from `{cfg['init_from']}` (tensors of equal shape copied; CLIP's position table "
                     "resampled to the new grid and the patch kernel resized, as when a ViT moves to a higher "
                     "resolution), not from random values.")
    return "\n".join(lines) + ("\n" if lines else "")


def write_model_card(model_dir: str | Path, batch_size: int = 64, name: str = "default model") -> str:
    """Measure the full-token model on both test sets and write its README.md (the model card)."""
    from . import data as datasets

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
    load = (f" The machine was shared: mean 1-minute load average {notes['mean_load']} on its {notes.get('cores', '?')} "
            "cores while it trained, so an idle machine is faster." if notes.get("mean_load") else "")
    command = f"\n\n    {notes['command']}\n" if notes.get("command") else ""
    card = f"""# tokensieve {name}

A small LLaVA-1.5-layout VLM trained on CPU by `training/train_default.py` as one of tokensieve's embedded
accuracy yardsticks. Stock `LlavaForConditionalGeneration`: CLIP vision tower ({cfg['vision_layers']} layers,
width {cfg['vision_width']}, {cfg['image_size']} px, patch {cfg['patch_size']}: {side}x{side} = {side * side}
visual tokens + CLS, features from layer -2), 2-layer GELU projector, Llama LM ({cfg['text_layers']} layers, width
{cfg['text_width']}), word-level tokenizer. {params / 1e6:.2f} M parameters, fp32.

Not a general model: it answers one-word questions about the two datasets below, and nothing else.

## Data
- `tokensieve.data.shapes` train split (procedural scenes, a fresh scene per sample), {100 * (1 - cfg['easyvqa_share']):.0f}% of samples.
- easy-VQA train split (PyPI `easy-vqa`, MIT, 38,575 questions on 4,000 images), {100 * cfg['easyvqa_share']:.0f}% of samples.
- Each training image carries up to {cfg.get('turns', 1)} of its questions as a conversation (shapes: one per
  family; easy-VQA: the image's own questions); the first turn is exactly the evaluation prompt.
- The first {cfg.get('curriculum_steps', 0)} steps use easy-VQA images only.
- {100 * cfg.get('describe_share', 0):.0f}% of images also end with a "describe the image ." turn whose answer lists every object (position,
  size, colour, shape), the count and the digit (for easy-VQA: colour and shape, from the image's own answers).
  The test sets contain only the question families; the shapes test split is never trained on.
{_recipe_lines(cfg)}
## Training
{notes.get('steps_done', cfg['steps'])} steps x batch {cfg['batch_size']}, AdamW (lr {cfg['lr']}, cosine to {cfg['min_lr']},
warmup {cfg['warmup']}, weight decay {cfg['weight_decay']}), loss on the answer words and EOS only, seed {cfg['seed']};
CLIP's learned position table starts from a 2-D sine-cosine grid{'' if cfg.get('sincos_positions', 0) else ' (off in this run)'}.
{notes.get('train_minutes', '?')} minutes of training on {notes.get('threads', '?')} CPU thread(s) ({notes.get('device', 'cpu')},
torch {notes.get('torch', '?')}).{load} Loss and probe accuracy history in `training.json`. Command:{command}
## Test accuracy (full tokens, greedy `generate()`, exact match)

| set | questions | accuracy | per family |
|---|---|---|---|
{chr(10).join(rows)}
"""
    (model_dir / "README.md").write_text(card)
    return card
