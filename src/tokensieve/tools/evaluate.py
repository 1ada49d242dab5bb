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
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adaptive import Adaptive
from ..data.prompts import prompt_text
from ..errors import InputError
from ..models.loading import EMBEDDED_MODELS, check_model_dir, load_model, model_fingerprint, model_path  # noqa: F401
from .configs import VANILLA, Config, format_budget

DEFAULT_MODEL_DIR = EMBEDDED_MODELS["default"].path
RESULTS_JSON = "results.json"
FORMAT = 2
"""``results.json`` layout: 2 = ``{"meta": ..., "records": [...]}``; files without ``format`` are the older bare
list of records, still readable for re-plotting and merging."""
MAX_NEW_TOKENS = 3
DEFAULT_CALIBRATION = 256
"""Calibration images per adaptive budget without a threshold (``tokensieve eval --calibration``)."""
CALIBRATION_SELECTION = {
    "shapes": "the first N scenes of the val split",
    "easyvqa": "N evenly spaced questions of the train split",
}


@dataclass
class Predictions:
    answers: list[str]
    kept_tokens: float
    """Mean visual tokens per image that the language model received."""
    tokens_in: float
    kept_per_question: list[float] = field(default_factory=list)
    """Visual tokens each question's image(s) kept (layer-averaged under an in-LLM stage)."""


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


@dataclass(frozen=True)
class CalibrationSet:
    """Questions whose images fit adaptive budgets that have no threshold: a split disjoint from the test set."""

    data: str
    split: str
    samples: Sequence

    @classmethod
    def of(cls, data: str, images: int) -> CalibrationSet:
        """``images`` samples of ``data``'s calibration split (:func:`tokensieve.data.calibration_samples`)."""
        from ..data import CALIBRATION_SPLITS, calibration_samples

        return cls(data, CALIBRATION_SPLITS[data], calibration_samples(data, images))

    def meta(self) -> dict:
        return {"data": self.data, "split": self.split, "images": len(self.samples)}


def calibrate(sieve, config: Config, model, processor, calibration: CalibrationSet | None, batch_size: int = 32):
    """Fit ``sieve``'s adaptive budget on ``calibration`` when ``config`` needs it; the fit, or ``None``."""
    if not config.needs_calibration:
        return None
    if calibration is None:
        raise InputError(
            f"{config.label} has no threshold yet and no calibration set was given: pass calibration "
            "images (tokensieve eval --calibration N), or give an earlier threshold as adaptive:MEAN@T"
        )
    from ..data import question_batches

    return sieve.calibrate(model, question_batches(processor, calibration.samples, batch_size))


def _accuracy(answers, samples) -> tuple[float, dict[str, float]]:
    right = defaultdict(int)
    count = defaultdict(int)
    for a, s in zip(answers, samples):
        count[s.family] += 1
        right[s.family] += a == s.answer
    acc = sum(right.values()) / max(1, len(samples))
    return acc, {f: right[f] / count[f] for f in sorted(count)}


def config_key(config: Config, params: dict | None, scope: str, calibration: CalibrationSet | None = None) -> str:
    """:func:`record_key` of the record ``config`` will produce (calibrated on ``calibration`` if it needs it)."""
    params = params or {}
    record = {
        "method": config.method,
        "budget": config.budget,
        "scope": scope,
        "params": {m: params[m] for m in config.methods if params.get(m)},
    }
    if config.needs_calibration and calibration is not None:
        record["adaptive"] = {"calibration": calibration.meta()}
    return record_key(record)


def record_key(record: dict) -> str:
    """What makes two records the same measurement: method chain, budget (as given: ``adaptive:36`` is not ``36``),
    hyper-parameters, scope, and for a calibrated adaptive budget the calibration split and size."""
    if record["method"] == VANILLA:
        return VANILLA
    key = [record["method"], record["budget"], record.get("params") or {}, record.get("scope", "image")]
    fitted_on = (record.get("adaptive") or {}).get("calibration")
    if fitted_on:
        key.append([fitted_on["split"], fitted_on["images"]])
    return json.dumps(key, sort_keys=True)


def _adaptive_value(sieve) -> Adaptive:
    """The sieve's adaptive budget (fitted, once calibrated)."""
    return next(b.value for b in (sieve.pre_budget, sieve.llm_budget) if b is not None and b.is_adaptive)


def _adaptive_entry(sieve, fit, calibration: CalibrationSet | None, pred: Predictions) -> dict:
    value = _adaptive_value(sieve)
    entry = {
        "budget": str(value),
        "criterion": value.criterion,
        "min": value.min,
        "max": value.max,
        "threshold": value.threshold,
        "calibration": None,
        "kept_range": [min(pred.kept_per_question, default=0), max(pred.kept_per_question, default=0)],
    }
    if fit is not None:
        entry["calibration"] = {
            **calibration.meta(),
            "sets": fit.sets,
            "target_mean": fit.target_mean,
            "mean": round(fit.achieved_mean, 4),
        }
    return entry


def _record(
    config: Config,
    params: dict,
    scope: str,
    pred: Predictions,
    samples,
    vanilla: dict | None,
    sieve=None,
    fit=None,
    calibration: CalibrationSet | None = None,
) -> dict:
    acc, fam = _accuracy(pred.answers, samples)
    base_answers = pred.answers if vanilla is None else vanilla["answers"]
    base_acc = acc if vanilla is None else vanilla["accuracy"]
    record = {
        "method": config.method,
        "params": {m: params[m] for m in config.methods if params.get(m)},
        "budget": config.budget,
        "scope": scope,
        "kept_tokens": round(pred.kept_tokens, 2),
        "tokens_in": round(pred.tokens_in, 2),
        "accuracy": acc,
        "relative": acc / base_acc if base_acc else None,
        "loyalty": sum(a == v for a, v in zip(pred.answers, base_answers)) / max(1, len(samples)),
        "families": fam,
        "questions": len(samples),
        "answers": pred.answers,
    }
    if config.adaptive is not None:
        record["adaptive"] = _adaptive_entry(sieve, fit, calibration, pred)
        record["kept_per_question"] = [round(k, 2) for k in pred.kept_per_question]
    if config.is_vanilla:
        record["params"], record["budget"] = {}, None
        del record["scope"]
    return record


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


def is_adaptive(record: dict) -> bool:
    """The record's budget (or one stage of its chain) is adaptive: its kept tokens are a measured mean."""
    budget = record.get("budget")
    return any(isinstance(b, str) for b in (budget if isinstance(budget, list) else [budget]))


def _twin_key(record: dict) -> str:
    """What pairs an adaptive record with the fixed record it compares to: same line, budget = the adaptive mean."""
    budget = record["budget"]
    mean = [
        Adaptive.parse(b).mean if isinstance(b, str) else b for b in (budget if isinstance(budget, list) else [budget])
    ]
    return json.dumps([_method_label(record), mean if isinstance(budget, list) else mean[0]])


def _table_rows(records: list[dict]) -> list[dict]:
    """Records in their order, each adaptive one moved right after the fixed budget of its method and mean."""
    fixed = {_twin_key(r) for r in records if r["method"] != VANILLA and not is_adaptive(r)}
    out = []
    for r in records:
        if is_adaptive(r) and _twin_key(r) in fixed:
            continue
        out.append(r)
        if r["method"] != VANILLA and not is_adaptive(r):
            out += [a for a in records if is_adaptive(a) and _twin_key(a) == _twin_key(r)]
    return out


def _adaptive_note(r: dict) -> str:
    a = r["adaptive"]
    cal = a["calibration"]
    fitted = (
        f"threshold fitted on {cal['images']} `{cal['split']}` images (mean there {cal['mean']:.2f})"
        if cal
        else "threshold given, no calibration"
    )
    lo, hi = a["kept_range"]
    return (
        f"- {_method_label(r)} at {format_budget(r['budget'])}: `{a['budget']}`, {fitted}; "
        f"test mean {r['kept_tokens']:.2f}, per question {lo:g} to {hi:g}"
    )


def markdown_table(records: list[dict], title: str = "") -> str:
    """One row per record, adaptive budgets next to the fixed budget of the same mean; a note per adaptive record
    (threshold, calibration, the per-question range its kept-token mean comes from)."""
    fams = list(records[0]["families"]) if records else []
    head = ["method", "budget", "kept tokens", "accuracy", "relative", "loyalty"] + fams
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = _table_rows(records)
    for r in rows:
        kept = f"{r['kept_tokens']:.1f}"
        if is_adaptive(r) and r.get("adaptive"):
            kept += " ({:g}-{:g})".format(*r["adaptive"]["kept_range"])
        cells = [
            r["method"],
            format_budget(r["budget"]),
            kept,
            f"{100 * r['accuracy']:.1f}",
            "-" if r["relative"] is None else f"{100 * r['relative']:.1f}%",
            f"{100 * r['loyalty']:.1f}%",
        ]
        cells += [f"{100 * r['families'][f]:.1f}" for f in fams]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [_adaptive_note(r) for r in rows if is_adaptive(r) and r.get("adaptive")]
    if notes:
        lines += [
            "",
            "Adaptive budgets keep a different count per image; their kept tokens are the measured mean over "
            "the questions (range per question in brackets), the threshold is fitted so the mean holds on "
            "calibration images, never test ones:",
            "",
        ] + notes
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    by_line = defaultdict(list)
    for r in records:
        if r["method"] != "none":
            by_line[(_method_label(r), _line_label(r), is_adaptive(r))].append((r["kept_tokens"], 100 * r["accuracy"]))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {m: cycle[i % len(cycle)] for i, m in enumerate(sorted({m for m, _, _ in by_line}))}
    for (method, name, adaptive), pts in sorted(by_line.items()):
        pts.sort()  # adaptive: the method's colour, dashed, squares; x is the measured mean
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="s" if adaptive else "o",
            label=name,
            color=colours[method],
            linestyle="--" if adaptive else "-",
            markerfacecolor="white" if adaptive else None,
        )
    for r in records:
        if r["method"] == "none":
            ax.axhline(
                100 * r["accuracy"],
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"full ({r['kept_tokens']:.0f} tokens)",
            )
            ax.plot([r["kept_tokens"]], [100 * r["accuracy"]], marker="*", color="black", markersize=10)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens kept per image (mean)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _method_label(record: dict) -> str:
    """A method with its hyper-parameters and scope (fastv with layer=1 is not fastv with layer=2): one colour."""
    extra = [
        f"{m}.{k}={v}"
        for m, p in sorted((record.get("params") or {}).items())
        if isinstance(p, dict)
        for k, v in sorted(p.items())
    ]
    if record.get("scope", "image") != "image":
        extra.append(f"scope={record['scope']}")
    return record["method"] + (f" ({', '.join(extra)})" if extra else "")


def _line_label(record: dict) -> str:
    """A plot line per method label, fixed and adaptive budgets apart (an adaptive line names its criterion when it
    is not the default)."""
    label = _method_label(record)
    if not is_adaptive(record):
        return label
    criterion = (record.get("adaptive") or {}).get("criterion", "coverage")
    return f"{label} adaptive" + ("" if criterion == "coverage" else f" ({criterion})")


def title_of(meta: dict | None, records: list[dict]) -> str:
    if not meta:
        return f"re-plotted results ({records[0]['questions'] if records else 0} questions)"
    name = "default model" if meta["model"]["model"] == "default" else meta["model"]["model"]
    return f"{meta['data']} {meta['split']} ({meta['questions']} questions), {name}"


def write_outputs(
    records: list[dict], out_dir: str | Path, title: str = "", meta: dict | None = None, plot_too: bool = True
) -> dict[str, Path]:
    """``results.json`` (metadata, records, per-question answers), ``results.md`` and ``results.png`` in ``out_dir``.

    The JSON is written to a temporary file and renamed, so an interrupted write never leaves a broken file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "md": out / "results.md", "png": out / "results.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(_dumps({"format": FORMAT, "meta": meta, "records": records}))
    tmp.replace(paths["json"])
    paths["md"].write_text(markdown_table(records, title))
    if plot_too:
        plot(records, paths["png"], title)
    return paths


_SCALAR_LIST = re.compile(r'\[\n(?:\s*(?:"(?:[^"\\\n]|\\.)*"|-?[\d.eE+-]+|true|false|null),?\n)+\s*\]')


def _dumps(payload) -> str:
    """Indented JSON with every list of plain values on one line (a thousand answers stay a thousand words, not a
    thousand lines)."""
    return _SCALAR_LIST.sub(
        lambda m: json.dumps(json.loads(m.group(0)), ensure_ascii=False),
        json.dumps(payload, indent=1, ensure_ascii=False),
    )


def read_results(path: str | Path, option: str = "--from") -> tuple[dict | None, list[dict]]:
    """``(meta, records)`` from a ``results.json`` (or the folder holding one); ``meta`` is ``None`` for files
    written before results carried metadata."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_JSON
    if not p.is_file():
        raise InputError(
            f"{option} {str(path)!r}: no {RESULTS_JSON} there; give a folder written by tokensieve eval "
            "or the file itself"
        )
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{option} {str(path)!r}: {p.name} cannot be read ({exc}); it is not a tokensieve eval result"
        ) from None
    if isinstance(data, list):
        return None, data
    if not isinstance(data, dict) or "records" not in data:
        raise InputError(f"{option} {str(path)!r}: {p.name} is not a tokensieve eval result (no records)")
    return data.get("meta"), data["records"]


IDENTITY = ("tokensieve", "model", "data", "split", "questions", "questions_sha256", "max_new_tokens")
"""Metadata that must agree for two results to be one evaluation (reused on resume, merged with ``--from``)."""


MODEL_IDENTITY = ("config_sha256", "weights", "built_in_memory")
"""What identifies a model in the metadata: its config and weights, not where the folder is or what it is called."""


def _differences(a: dict | None, b: dict | None) -> list[str]:
    if a is None or b is None:
        return [] if a is b else ["one of them has no metadata (written by an older tokensieve)"]
    out = []
    for key in IDENTITY:
        va, vb = a.get(key), b.get(key)
        if key == "model" and isinstance(va, dict) and isinstance(vb, dict):
            va, vb = ({k: v.get(k) for k in MODEL_IDENTITY} for v in (va, vb))
        if va != vb:
            if isinstance(va, dict) and isinstance(vb, dict):
                inner = [k for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
                out.append(f"{key} ({', '.join(inner)} differ)")
            else:
                out.append(f"{key}: {va!r} vs {vb!r}")
    return out


def eval_meta(model_spec, data: str, samples: Sequence, limit: int | None, batch_size: int) -> dict:
    import hashlib
    import time

    import transformers

    from .. import __version__

    items = {
        "question": [s.question for s in samples],
        "answer": [s.answer for s in samples],
        "family": [s.family for s in samples],
    }
    digest = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()
    return {
        "tokensieve": __version__,
        "model": model_fingerprint(model_spec),
        "data": data,
        "split": "test",
        "limit": limit,
        "questions": len(samples),
        "questions_sha256": digest,
        "max_new_tokens": MAX_NEW_TOKENS,
        "decoding": "greedy, exact match after strip + lower-case",
        "batch_size": batch_size,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "items": items,
    }


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
