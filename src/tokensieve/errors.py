"""Exceptions raised by tokensieve.

Every error a user can trigger with bad input derives from :class:`TokensieveError` *and* from the built-in
exception a Python user would expect (``ValueError`` or ``TypeError``), so ``except ValueError`` keeps working.
"""


class TokensieveError(Exception):
    """Base class of every error tokensieve raises on purpose."""


class BudgetError(TokensieveError, ValueError):
    """The budget is not a usable number of tokens or keep ratio for this input."""


class BudgetTypeError(TokensieveError, TypeError):
    """The budget is not a number at all."""


class UnknownMethodError(TokensieveError, KeyError):
    """No method is registered under that name."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(TokensieveError, TypeError):
    """No adapter knows this model class."""


class PlaceholderError(TokensieveError, ValueError):
    """The image placeholders in ``input_ids`` do not match the images given."""


class NonFiniteFeaturesError(TokensieveError, ValueError):
    """The vision features contain NaN or Inf, so no ranking of them means anything."""


class MissingSignalError(TokensieveError, ValueError):
    """A method needs a signal (for example CLS attention) that this model cannot provide."""


class StageError(TokensieveError, ValueError):
    """Methods were combined in a way the stages cannot run (two in-LLM methods, wrong order, missing budgets)."""


class InputError(TokensieveError, ValueError):
    """A file, path, prompt or option value given to a command cannot be used (the message says how to fix it)."""


class ParameterError(TokensieveError, ValueError, TypeError):
    """A method's hyper-parameter is unknown, has a bad value, or does not fit this model (a layer its encoder or LM
    does not have). One class for every such mistake, and both a ``ValueError`` and a ``TypeError``: a bad keyword
    argument is a ``TypeError`` in Python, a bad value a ``ValueError``, and either ``except`` keeps working."""
