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
