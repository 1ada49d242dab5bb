"""Accuracy retention: the full-token model once, then every method x budget on the same questions.

Batches are left-padded and decoded greedily; an answer is right when the generated text, stripped and lower-cased,
equals the reference word. ``loyalty`` is the share of answers identical to the full-token model's, right or wrong:
it separates "the method broke the model" from "the model was wrong anyway".

Adaptive budgets (``adaptive:MEAN``) fix a mean, not a count, so their x position is what they measured: a record's
``kept_tokens`` is always the mean over the evaluated questions. One without a threshold is first calibrated
(``Sieve.calibrate``) on a :class:`CalibrationSet`, images of the data set's calibration split (never the test
split); the record's ``adaptive`` entry keeps the fitted threshold, the calibration size and the mean reached there,
and ``kept_per_question`` each question's count. The calibration size is part of the record's key, so resuming with
another ``--calibration`` refits, and ``adaptive:36`` is never the same record as ``36``.

This module runs an evaluation the way ``tokensieve eval`` does: every configuration tried first, then answered,
saved after each and resumed. What a run writes down is in :mod:`.records`, the calibration images in
:mod:`.calibration`, and the files, tables and plots in :mod:`.results`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import InputError
from ..models.loading import EMBEDDED_MODELS, check_model_dir, load_model, model_path  # noqa: F401
from ..trainer import prompt_text
from .calibration import CALIBRATION_SELECTION, DEFAULT_CALIBRATION, CalibrationSet, calibrate
from .configs import VANILLA, Config, group_params, parse_configs
from .console import Out, model_note, quiet_loading
from .inputs import prepare_out_dir
from .records import MAX_NEW_TOKENS, Predictions, _accuracy, _differences, _record, config_key, eval_meta, record_key
from .results import RESULTS_JSON, markdown_table, read_results, title_of, write_outputs

DEFAULT_MODEL_DIR = EMBEDDED_MODELS["default"].path


def predict(
    model,
    processor,
    samples: Sequence,
    *,
    sieve=None,
    batch_size: int = 32,
    max_new_tokens: int = 3,
    advance: Callable[[int], None] | None = None,
) -> Predictions:
    """Greedy answers for ``samples`` (objects with ``image`` and ``question``), under ``sieve`` if given."""
    from contextlib import nullcontext

    image_token = model.config.image_token_id
    answers: list[str] = []
    kept: list[float] = []
    total = 0
    with torch.inference_mode(), sieve(model) if sieve is not None else nullcontext():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            inputs = processor(
                images=[s.image for s in chunk],
                text=[prompt_text(processor, s.question) for s in chunk],
                return_tensors="pt",
                padding=True,
            )
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answers += [
                a.strip().lower()
                for a in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            ]
            n_in = (inputs["input_ids"] == image_token).sum(dim=1).tolist()
            total += sum(n_in)
            kept += n_in if sieve is None else _kept_per_sample(sieve.last_report, len(chunk))
            if advance is not None:
                advance(len(chunk))
    n = max(len(samples), 1)
    return Predictions(answers, sum(kept) / n, total / n, kept)


def _kept_per_sample(report, samples: int) -> list[float]:
    """Visual tokens each sample of a call kept; under an in-LLM stage, averaged over the decoder layers."""
    if report.llm_visual_tokens_avg:
        return list(report.llm_visual_tokens_avg)
    kept = [0.0] * samples
    for im in report.images:
        kept[im.sample] += im.tokens_out
    return kept


def preflight(
    model,
    processor,
    samples,
    configs: Sequence[Config],
    params: dict,
    scope: str,
    calibration: CalibrationSet | None = None,
) -> None:
    """Run every configuration once on the first question, so one that cannot work on this model (an unreachable
    in-LLM budget, a layer beyond the encoder, an unsupported stage) fails before any evaluation starts. An adaptive
    budget without a threshold is first calibrated on the first calibration image only (the real fit comes later),
    and is also run at its smallest per-image count: some image of the test set may get it, and whether one does
    depends on the model and the images, so the one calibration image alone would not say."""
    first = samples[:1]
    one = None if calibration is None else CalibrationSet(calibration.data, calibration.split, calibration.samples[:1])
    failures = []
    for config in configs:
        where = ""
        try:
            sieve = config.sieve(params, scope)
            calibrate(sieve, config, model, processor, one, batch_size=1)
            predict(model, processor, first, sieve=sieve, batch_size=1, max_new_tokens=1)
            if config.adaptive is not None:
                where = " at its smallest per-image count"
                predict(
                    model,
                    processor,
                    first,
                    sieve=_at_floor(config).sieve(params, scope),
                    batch_size=1,
                    max_new_tokens=1,
                )
        except Exception as exc:  # every failure is reported, with the configuration it belongs to
            failures.append(f"{config.label}{where}: {' '.join(str(exc).split()) or type(exc).__name__}")
    if failures:
        raise InputError(
            f"{len(failures)} of {len(configs)} configuration(s) cannot run on this model, so nothing "
            f"was evaluated: {'; '.join(failures)}"
        )


FLOOR_THRESHOLD = 1e30
"""A threshold every residual curve meets at once, so an adaptive budget gives each image its smallest count."""


def _at_floor(config: Config) -> Config:
    """``config`` with its adaptive budget pinned to the smallest count of its range on every image."""
    return Config(
        config.methods,
        tuple(f"{b.partition('@')[0]}@{FLOOR_THRESHOLD:g}" if isinstance(b, str) else b for b in config.budgets),
    )


def evaluate(
    model,
    processor,
    samples: Sequence,
    configs: Sequence[Config],
    *,
    params: dict | None = None,
    scope: str = "image",
    batch_size: int = 32,
    done: dict | None = None,
    on_record=None,
    progress: bool = True,
    console=None,
    calibration: CalibrationSet | None = None,
) -> list[dict]:
    """Records for the full-token model (method ``none``) and each configuration, in that order.

    ``params`` maps a method name to its hyper-parameters (the 4-layer default LM needs ``{"fastv": {"layer": 1}}``
    for budgets below 73). ``done`` maps :func:`record_key` to records of an earlier run of the same evaluation;
    those are reused, not recomputed. ``on_record(records)`` is called after every finished record, so a caller can
    save as it goes. ``calibration`` fits every adaptive budget that has no threshold, just before it runs.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    params = params or {}
    done = dict(done or {})
    runs = [Config((VANILLA,))] + list(configs)
    todo = [(config, config_key(config, params, scope, calibration)) for config in runs]
    records = []
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    total = sum(len(samples) for _, key in todo if key not in done)
    with Progress(*columns, console=console, disable=not progress or total == 0, transient=False) as bar:
        task = bar.add_task("", total=total)
        vanilla = None
        for config, key in todo:
            if key in done:
                record = done[key]
            else:
                bar.update(task, description="none (full tokens)" if config.is_vanilla else config.label)
                sieve = None if config.is_vanilla else config.sieve(params, scope)
                fit = calibrate(sieve, config, model, processor, calibration, batch_size)
                pred = predict(
                    model,
                    processor,
                    samples,
                    sieve=sieve,
                    batch_size=batch_size,
                    max_new_tokens=MAX_NEW_TOKENS,
                    advance=lambda n: bar.advance(task, n),
                )
                record = _record(config, params, scope, pred, samples, vanilla, sieve, fit, calibration)
            if vanilla is None:
                vanilla = record
            records.append(record)
            if on_record is not None and key not in done:
                on_record(records)
    return records


def cmd_eval(args, out: Out) -> int:
    from ..cli import EVAL_BUDGETS, EVAL_METHODS  # the parser shows them in --help

    if args.sources:
        given = [
            o
            for o, v in (
                ("--methods", args.methods),
                ("--budgets", args.budgets),
                ("--param", args.param or None),
                ("--model", args.model),
                ("--limit", args.limit),
            )
            if v is not None
        ]
        if given:
            raise ValueError(
                f"--from re-plots saved results and runs no model, so {', '.join(given)} cannot apply; "
                "drop them, or drop --from to evaluate"
            )
        prepare_out_dir(args.out)
        result = merge_results(args.sources, args.out, log=out.note)
    else:
        configs = parse_configs(
            EVAL_METHODS if args.methods is None else args.methods,
            EVAL_BUDGETS if args.budgets is None else args.budgets,
            calibrates=True,
        )
        params = group_params(args.param, configs)
        for config in configs:
            config.sieve(params, args.scope)  # chains, budgets and parameters, before anything runs
        prepare_out_dir(args.out)
        model_note(args.model, out)
        quiet_loading()
        result = run_eval(
            args.model,
            args.data,
            configs,
            args.out,
            limit=args.limit,
            batch_size=args.batch_size,
            params=params,
            scope=args.scope,
            fresh=args.fresh,
            console=out.err,
            log=out.note,
            calibration=args.calibration,
        )
    table = markdown_table(result["records"], result["title"])
    if out.console.is_terminal:
        from rich.markdown import Markdown

        out.console.print(Markdown(table))
    else:
        print(table, end="")
    out.note(f"wrote results.json, results.md, results.png to {args.out}")
    return 0


def run_eval(
    model_spec,
    data: str,
    configs: Sequence[Config],
    out_dir,
    *,
    limit=None,
    batch_size: int = 32,
    params: dict | None = None,
    scope: str = "image",
    fresh: bool = False,
    progress: bool = True,
    console=None,
    log=print,
    calibration: int = DEFAULT_CALIBRATION,
) -> dict:
    """What ``tokensieve eval`` does: check, load, evaluate (saving after every finished configuration), write.

    A ``results.json`` already in ``out_dir`` from the same evaluation (same model, questions, version) is resumed:
    its finished configurations are kept and only the missing ones run. Its records for configurations not asked
    for now are kept too, after the requested ones. ``fresh`` ignores it. Adaptive budgets without a threshold are
    fitted on ``calibration`` images of the data set's calibration split.
    """
    from .. import data as datasets

    out = Path(out_dir)
    if model_path(model_spec) is not None:
        check_model_dir(model_path(model_spec))  # before anything reads the folder
    existing = None
    if (out / RESULTS_JSON).exists() and not fresh:
        existing = read_results(out, "--out")
    samples = datasets.load(data, "test", limit)
    meta = eval_meta(model_spec, data, samples, limit, batch_size)
    calib = CalibrationSet.of(data, calibration) if any(c.needs_calibration for c in configs) else None
    if calib is not None:
        meta["calibration"] = {**calib.meta(), "selection": CALIBRATION_SELECTION[data]}
    done: dict[str, dict] = {}
    extra: list[dict] = []
    if existing is not None:
        diff = _differences(existing[0], meta)
        if diff:
            raise InputError(
                f"--out {str(out_dir)!r} already holds results of another evaluation ({'; '.join(diff)}); "
                "choose another --out, or pass --fresh to replace them"
            )
        done = {record_key(r): r for r in existing[1]}
    model, processor = load_model(model_spec)
    keys = [VANILLA] + [config_key(c, params, scope, calib) for c in configs]
    missing = [c for c, k in zip(configs, keys[1:]) if k not in done]
    if done:
        log(
            f"resuming {out / RESULTS_JSON}: {sum(k in done for k in keys)} finished result(s) reused, "
            f"{len(keys) - sum(k in done for k in keys)} to run (--fresh recomputes everything)"
        )
        extra = [r for k, r in done.items() if k not in set(keys)]
    preflight(model, processor, samples, missing, params or {}, scope, calib)
    title = title_of(meta, [])
    saved: list[dict] = []

    def save(records, plot_too=False):
        saved[:] = records
        write_outputs(records + extra, out, title, meta, plot_too=plot_too)

    try:
        records = evaluate(
            model,
            processor,
            samples,
            configs,
            params=params,
            scope=scope,
            batch_size=batch_size,
            done=done,
            on_record=save,
            progress=progress,
            console=console,
            calibration=calib,
        )
    except BaseException:
        if saved:
            save(saved, plot_too=True)
            log(
                f"stopped: {len(saved)} of {len(keys)} results are saved in {out / RESULTS_JSON}; run the same "
                "command again to finish the rest"
            )
        raise
    save(records, plot_too=True)
    return {"meta": meta, "records": records + extra, "title": title}


def merge_results(sources: Sequence, out_dir, log=print) -> dict:
    """Re-plot one earlier result or merge several of the same evaluation (same model and questions) into
    ``out_dir``, running no model. A configuration found twice is taken from the first source that has it."""
    loaded = [(src, *read_results(src)) for src in sources]
    meta = loaded[0][1]
    for src, other, _ in loaded[1:]:
        diff = _differences(meta, other)
        if diff:
            raise InputError(
                f"--from {str(loaded[0][0])!r} and --from {str(src)!r} are different evaluations "
                f"({'; '.join(diff)}); only results of the same model and questions can be merged"
            )
    merged: dict[str, dict] = {}
    for _, _, records in loaded:
        for r in records:
            merged.setdefault(record_key(r), r)
    records = sorted(merged.values(), key=lambda r: r["method"] != VANILLA)
    title = title_of(meta, records)
    write_outputs(records, out_dir, title, meta)
    log(f"merged {len(records)} result(s) from {len(loaded)} source(s)")
    return {"meta": meta, "records": records, "title": title}


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
