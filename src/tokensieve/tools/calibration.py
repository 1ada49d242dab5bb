"""The images an adaptive budget without a threshold is fitted on, before it is evaluated.

They come from the data set's calibration split, never the test split, so the fitted threshold has not seen the
questions it is scored on. How many is part of the record's key: resuming with another ``--calibration`` refits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError
from .configs import Config

DEFAULT_CALIBRATION = 256
"""Calibration images per adaptive budget without a threshold (``tokensieve eval --calibration``)."""
CALIBRATION_SELECTION = {
    "shapes": "the first N scenes of the val split",
    "easyvqa": "N evenly spaced questions of the train split",
}


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
