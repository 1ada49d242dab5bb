"""What an evaluation writes down: its metadata (model, questions, versions) and one record per configuration (accuracy,
loyalty, kept tokens, the adaptive fit), with the keys that say when two are the same measurement.

The keys and the identity are what make resuming and merging safe: a finished record is reused only for the same
configuration on the same evaluation, and results of another model or other questions are never mixed in.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..adaptive import Adaptive
from ..models.loading import model_fingerprint
from .calibration import CalibrationSet
from .configs import VANILLA, Config

MAX_NEW_TOKENS = 3
"""Answers are one word. Part of a result's identity (:data:`IDENTITY`): longer answers are another evaluation."""


@dataclass
class Predictions:
    answers: list[str]
    kept_tokens: float
    """Mean visual tokens per image that the language model received."""
    tokens_in: float
    kept_per_question: list[float] = field(default_factory=list)
    """Visual tokens each question's image(s) kept (layer-averaged under an in-LLM stage)."""


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

    import torch
    import transformers

    from .._version import __version__

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
