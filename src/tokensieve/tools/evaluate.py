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

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..data.prompts import prompt_text
from ..errors import InputError
from ..models.loading import EMBEDDED_MODELS, check_model_dir, load_model, model_path  # noqa: F401
from .calibration import CALIBRATION_SELECTION, DEFAULT_CALIBRATION, CalibrationSet, calibrate
from .configs import VANILLA, Config
from .records import MAX_NEW_TOKENS, Predictions, _differences, _record, config_key, eval_meta, record_key
from .results import RESULTS_JSON, read_results, title_of, write_outputs

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
