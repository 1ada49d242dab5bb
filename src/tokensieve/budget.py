"""One budget vocabulary for every method.

A budget is either an ``int`` (visual tokens kept per unit) or a ``float`` in (0, 1] (share of tokens kept per
unit); the *scope* says what a unit is. Methods never see the user's value, only the resolved integer ``k`` for
the token count they are given, so "64 tokens" means the same thing for every method in a comparison table.
An :class:`~tokensieve.adaptive.Adaptive` value (or the text ``"adaptive:64"``) fixes the *mean* per unit instead;
it resolves to an :class:`~tokensieve.adaptive.AdaptiveTarget` that the selection step turns into a count per unit.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from enum import Enum

from .errors import BudgetError, BudgetTypeError

# -- adaptive budgets' value types (the rule and its calibration: tokensieve.adaptive) -------------------------

CRITERIA = ("coverage", "radius", "scores")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class Adaptive:
    """A per-image budget whose *mean* is fixed; ints are tokens per image, floats keep ratios (all of one kind).

    ``min`` / ``max`` bound every image (defaults: ``mean // 4`` and ``3 * mean`` capped at the token count).
    ``threshold`` is the fitted per-image rule (``Sieve.calibrate`` sets it); ``criterion`` is ``"coverage"`` or
    ``"scores"`` (see the module docstring).
    """

    mean: int | float
    min: int | float | None = None
    max: int | float | None = None
    threshold: float | None = None
    criterion: str = "coverage"

    def __post_init__(self) -> None:
        values = {"mean": self.mean, "min": self.min, "max": self.max}
        for name, v in values.items():
            if v is None and name != "mean":
                continue
            if not _is_real(v):
                raise BudgetTypeError(f"Adaptive {name} must be an int (tokens) or a float (keep ratio), got {v!r}")
        ratio = not _is_int(self.mean)
        for name, v in values.items():
            if v is None:
                continue
            if _is_int(v) == ratio:
                raise BudgetTypeError(
                    f"Adaptive mean, min and max must all be ints (tokens) or all floats (keep ratios); {name}={v!r} "
                    f"does not match mean={self.mean!r}"
                )
            if ratio and not (math.isfinite(v) and 0.0 < v <= 1.0):
                raise BudgetError(f"Adaptive {name} is a keep ratio and must lie in (0, 1], got {v}")
            if not ratio and v < 1:
                raise BudgetError(f"Adaptive {name} must keep at least one token, got {v}")
        lo, hi = self.min, self.max
        if lo is not None and self.mean < lo:
            raise BudgetError(f"Adaptive mean {self.mean} is below min {lo}; the mean must lie in [min, max]")
        if hi is not None and self.mean > hi:
            raise BudgetError(f"Adaptive mean {self.mean} is above max {hi}; the mean must lie in [min, max]")
        if self.threshold is not None and not (_is_real(self.threshold) and math.isfinite(self.threshold)):
            raise BudgetError(f"Adaptive threshold must be a finite number or None, got {self.threshold!r}")
        if self.criterion not in CRITERIA:
            raise BudgetError(f"unknown Adaptive criterion {self.criterion!r}; use one of {list(CRITERIA)}")

    @property
    def is_ratio(self) -> bool:
        return not _is_int(self.mean)

    @property
    def needs_no_threshold(self) -> bool:
        """``mean`` equals ``min`` or ``max``: every image gets the mean, so there is nothing to fit."""
        return self.mean in (self.min, self.max)

    @classmethod
    def parse(cls, text: str) -> Adaptive:
        """``adaptive:MEAN`` or ``adaptive:MEAN:MIN:MAX`` (ints: tokens; floats: keep ratios; an empty MIN or MAX
        takes its default), optionally ``@THRESHOLD`` from an earlier calibration (what ``str()`` prints)."""
        body, at, tail = text.strip().partition("@")
        threshold = None
        if at:
            try:
                threshold = float(tail)
            except ValueError:
                raise BudgetError(f"the threshold after '@' in {text!r} is not a number") from None
        parts = body.split(":")
        if parts[0].strip().lower() != "adaptive" or len(parts) not in (2, 4) or not parts[1].strip():
            raise BudgetError(
                "an adaptive budget reads adaptive:MEAN or adaptive:MEAN:MIN:MAX (e.g. adaptive:64:16:192), "
                f"got {text!r}"
            )
        nums = []
        for p in parts[1:]:
            p = p.strip()
            if not p:
                nums.append(None)
                continue
            try:
                nums.append(int(p))
            except ValueError:
                try:
                    nums.append(float(p))
                except ValueError:
                    raise BudgetError(f"{p!r} in {text!r} is not a number") from None
        if len(nums) == 1:
            return cls(nums[0], threshold=threshold)
        return cls(nums[0], nums[1], nums[2], threshold=threshold)

    def target(self, n: int, what: str = "image") -> AdaptiveTarget:
        """The bounds in tokens for a candidate set of ``n`` tokens."""
        if n <= 0:
            raise BudgetError(f"{what} has no visual tokens to select from")
        if self.is_ratio:
            mean = max(1, min(n, round(self.mean * n)))
            lo = max(1, min(mean, round(self.min * n))) if self.min is not None else max(1, mean // 4)
            hi = max(mean, min(n, round(self.max * n))) if self.max is not None else min(n, 3 * mean)
        else:
            for name, v in (("mean", self.mean), ("min", self.min), ("max", self.max)):
                if v is not None and v > n:
                    raise BudgetError(
                        f"Adaptive {name} of {v} tokens exceeds the {n} visual tokens of {what}; use at most {n}"
                    )
            mean = int(self.mean)
            lo = int(self.min) if self.min is not None else max(1, mean // 4)
            hi = int(self.max) if self.max is not None else min(n, 3 * mean)
        return AdaptiveTarget(lo, mean, hi, self.threshold, self.criterion)

    def calibrated(self, threshold: float) -> Adaptive:
        return replace(self, threshold=float(threshold))

    def __str__(self) -> str:
        fmt = (lambda v: f"{v:g}") if self.is_ratio else str
        text = f"adaptive:{fmt(self.mean)}"
        if self.min is not None or self.max is not None:
            text += f":{'' if self.min is None else fmt(self.min)}:{'' if self.max is None else fmt(self.max)}"
        if self.threshold is not None:
            text += f"@{self.threshold!r}"
        return text


@dataclass(frozen=True)
class AdaptiveTarget:
    """An adaptive budget resolved for one candidate set: counts in [lo, hi] whose calibrated mean is ``mean``."""

    lo: int
    mean: int
    hi: int
    threshold: float | None
    criterion: str

    def split(self, parts: int) -> list[AdaptiveTarget]:
        """Share lo, mean and hi evenly over ``parts`` crops, as a fixed budget is shared (each crop at least 1)."""

        def share(total: int, j: int) -> int:
            return max(1, total // parts + (1 if j < total % parts else 0))

        out = []
        for j in range(parts):
            lo, mean, hi = share(self.lo, j), share(self.mean, j), share(self.hi, j)
            out.append(AdaptiveTarget(min(lo, mean), mean, max(hi, mean), self.threshold, self.criterion))
        return out

    def clamp(self, n: int) -> AdaptiveTarget | int:
        """The same target on a set of only ``n`` candidates (0: nothing to select)."""
        if n <= 0:
            return 0
        return AdaptiveTarget(min(self.lo, n), min(self.mean, n), min(self.hi, n), self.threshold, self.criterion)


# -- residual curves --------------------------------------------------------------------------------------------


# -- the budget ----------------------------------------------------------------------------------------------


class Scope(str, Enum):
    """What one budget applies to.

    ``image``: each image (LLaVA-1.5's one 576-token grid). ``crop``: each crop of an anyres image.
    ``frame``: each video frame. ``global``: all visual tokens of one prompt together. An adapter states which
    scopes it can honour; on single-grid models an image *is* a crop, so both names are accepted there.
    """

    IMAGE = "image"
    CROP = "crop"
    FRAME = "frame"
    GLOBAL = "global"


@dataclass(frozen=True)
class Budget:
    """A validated budget: ``value`` is an int (tokens), a float (keep ratio) or an :class:`Adaptive` mean."""

    value: int | float | Adaptive
    scope: Scope = Scope.IMAGE

    @classmethod
    def parse(cls, value, scope: str | Scope = Scope.IMAGE) -> Budget:
        """Validate ``value`` early, so a typo fails before any model work is done."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str) and value.strip().lower().startswith("adaptive"):
            value = Adaptive.parse(value)
        if not isinstance(value, Adaptive) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise BudgetTypeError(
                f"budget must be an int (tokens kept per {Scope(scope).value}) or a float in (0, 1] (keep ratio), "
                f"or tokensieve.Adaptive(mean=...) / 'adaptive:MEAN', got {value!r} of type {type(value).__name__}"
            )
        try:
            scope = Scope(scope)
        except ValueError:
            raise BudgetError(f"unknown budget scope {scope!r}; choose one of {[s.value for s in Scope]}") from None
        if isinstance(value, Adaptive):
            return cls(value, scope)
        if isinstance(value, numbers.Integral):
            value = int(value)
            if value <= 0:
                raise BudgetError(f"budget must keep at least one token, got {value}")
            return cls(value, scope)
        value = float(value)
        if not math.isfinite(value) or value <= 0.0 or value > 1.0:
            raise BudgetError(
                f"a float budget is a keep ratio and must lie in (0, 1], got {value}; "
                "pass an int to ask for a number of tokens"
            )
        return cls(value, scope)

    @property
    def is_ratio(self) -> bool:
        return isinstance(self.value, float) or (self.is_adaptive and self.value.is_ratio)

    @property
    def is_adaptive(self) -> bool:
        return isinstance(self.value, Adaptive)

    def resolve(self, n_tokens: int, what: str = "image") -> int | AdaptiveTarget:
        """Tokens to keep out of ``n_tokens`` (an :class:`AdaptiveTarget` for adaptive budgets).

        A ratio rounds to the nearest count and never below one token; an int larger than the count is an
        error rather than a silent keep-all, because it nearly always means the budget was written for a
        different model (576-token budgets on a 64-token encoder).
        """
        if n_tokens <= 0:
            raise BudgetError(f"{what} has no visual tokens to select from")
        if self.is_adaptive:
            return self.value.target(n_tokens, what)
        if self.is_ratio:
            return max(1, min(n_tokens, int(round(self.value * n_tokens))))
        if self.value > n_tokens:
            raise BudgetError(
                f"budget of {self.value} tokens exceeds the {n_tokens} visual tokens of {what}; "
                f"use at most {n_tokens}, or a float keep ratio"
            )
        return int(self.value)

    def __str__(self) -> str:
        if self.is_adaptive:
            return str(self.value)
        return f"{self.value:g}" if self.is_ratio else str(self.value)
