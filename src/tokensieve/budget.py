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
from dataclasses import dataclass
from enum import Enum

from .adaptive import Adaptive, AdaptiveTarget
from .errors import BudgetError, BudgetTypeError


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
