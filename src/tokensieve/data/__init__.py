"""Benchmark data: the procedural ``shapes`` set and the packaged third-party ``easyvqa`` set."""

from __future__ import annotations

DATASETS = ("shapes", "easyvqa")


def load(name: str, split: str = "test", limit: int | None = None):
    """A list of :class:`~tokensieve.data.shapes.Sample` (image, question, answer, family)."""
    if name == "shapes":
        from . import shapes

        return shapes.dataset(split, limit)
    if name == "easyvqa":
        from . import easyvqa

        return easyvqa.dataset(split, limit)
    raise ValueError(f"unknown dataset {name!r}; use one of {DATASETS}")


CALIBRATION_SPLITS = {"shapes": "val", "easyvqa": "train"}
"""Where adaptive budgets are calibrated: a split disjoint from the test set (easy-VQA has no validation split)."""


def calibration_samples(name: str, limit: int = 256):
    """``limit`` evenly spaced samples of the data set's calibration split (never the test split)."""
    if name not in CALIBRATION_SPLITS:
        raise ValueError(f"unknown dataset {name!r}; use one of {DATASETS}")
    return load(name, CALIBRATION_SPLITS[name], limit)


def question_batches(processor, samples, batch_size: int = 32):
    """Processor batches (left-padded, the evaluation prompt) of ``samples``, in order."""
    from .prompts import prompt_text

    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        yield processor(
            images=[s.image for s in chunk],
            text=[prompt_text(processor, s.question) for s in chunk],
            return_tensors="pt",
            padding=True,
        )
