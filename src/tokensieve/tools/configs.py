"""One grammar for methods, budgets and hyper-parameters on every command.

``+`` chains the stages of one configuration: ``--method evocut+fastv --budget 192+128`` is one sieve, one budget per
method. ``,`` separates configurations to compare: ``--methods evocut,divprune --budgets 64,32`` is four (every
method at every budget). ``run`` takes one configuration; ``show``, ``eval`` and ``bench`` take lists.
``--param METHOD.NAME=VALUE`` sets one method's hyper-parameter (a plain ``NAME=VALUE`` is enough when the command
names a single method).

Parsing imports nothing heavy, so ``--help`` stays instant; method names are checked when a command builds its
configurations (:func:`parse_configs`), before any model is loaded.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from ..budget import Budget
from ..errors import BudgetError, InputError

VANILLA = "none"
"""Label of the full-token (uncompressed) configuration."""


def parse_budget(text: str, option: str = "--budget") -> int | float | str:
    """One budget value: an int (tokens), a float in (0, 1] (keep ratio), or an adaptive budget's text
    (``adaptive:MEAN[:MIN:MAX][@THRESHOLD]``, kept as text: ``Sieve`` parses it)."""
    text = text.strip()
    if text.lower().startswith("adaptive"):
        try:
            Budget.parse(text)
        except BudgetError as exc:
            raise BudgetError(f"{option} {text}: {exc}") from None
        return text
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise BudgetError(
                f"{option} {text!r} is neither an int (tokens kept per image, e.g. 64) nor a float in (0, 1] "
                "(keep ratio, e.g. 0.25) nor an adaptive budget (adaptive:MEAN[:MIN:MAX][@THRESHOLD])"
            ) from None
    try:
        Budget.parse(value)
    except BudgetError as exc:
        raise BudgetError(f"{option} {text}: {exc}") from None
    return value


def format_budget(budget) -> str:
    """``64``, ``0.25``, or ``192+128`` for a chain (the CLI spelling)."""
    if isinstance(budget, (list, tuple)):
        return "+".join(format_budget(b) for b in budget)
    return "-" if budget is None else str(budget)


@dataclass(frozen=True)
class Config:
    """One configuration: the chained methods of one sieve and one budget per method (``none``: full tokens)."""

    methods: tuple[str, ...]
    budgets: tuple[int | float, ...] = ()

    @classmethod
    def single(cls, method: str, budget) -> Config:
        return cls((method,), (budget,))

    @property
    def method(self) -> str:
        return "+".join(self.methods)

    @property
    def budget(self):
        """The budget as JSON writes it: a number, a list for a chain, ``None`` for the full-token model."""
        if not self.budgets:
            return None
        return self.budgets[0] if len(self.budgets) == 1 else list(self.budgets)

    @property
    def is_vanilla(self) -> bool:
        return self.methods == (VANILLA,)

    @property
    def adaptive(self):
        """The :class:`~tokensieve.adaptive.Adaptive` budget of this configuration (at most one), or ``None``."""
        values = [Budget.parse(b).value for b in self.budgets if isinstance(b, str)]
        return values[0] if values else None

    @property
    def needs_calibration(self) -> bool:
        """An adaptive budget without a threshold whose images do not all get the mean: it must be calibrated
        (``Sieve.calibrate``) before it can run; ``adaptive:MEAN@THRESHOLD`` runs as given."""
        value = self.adaptive
        return value is not None and value.threshold is None and not value.needs_no_threshold

    @property
    def label(self) -> str:
        return VANILLA if self.is_vanilla else f"{self.method}@{format_budget(self.budgets)}"

    def sieve(self, params: dict[str, dict] | None = None, scope: str = "image"):
        """The :class:`~tokensieve.Sieve` of this configuration, hyper-parameters taken per method from ``params``."""
        from ..session import Sieve

        return Sieve.from_names(self.methods, self.budgets, scope=scope, params=params)


def _split(text: str, option: str, what: str) -> list[str]:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise InputError(f"{option} {text!r}: give one or more {what} separated by commas, with nothing empty between")
    return parts


def parse_configs(
    methods: str,
    budgets: str,
    *,
    method_option: str = "--methods",
    budget_option: str = "--budgets",
    single: bool = False,
    calibrates: bool = False,
) -> list[Config]:
    """Every method configuration at every budget, in the order given; names and budgets checked, nothing loaded.

    ``single``: the command runs one configuration (``run``); a comma is refused with a pointer to the commands that
    compare several. ``calibrates``: the command fits adaptive thresholds itself (``eval``); elsewhere an adaptive
    budget must carry its threshold, and one without is refused here, before any model loads.
    """
    chains = _split(methods, method_option, "method names")
    values = _split(budgets, budget_option, "budgets")
    if single and (len(chains) > 1 or len(values) > 1):
        raise InputError(
            f"run answers with one configuration; got {method_option} {methods!r} --budget {budgets!r}. Chain stages "
            "with '+' (--method evocut+fastv --budget 192+128); compare several with show, eval or bench "
            "(--methods evocut,divprune --budgets 64,32)"
        )
    parsed_budgets = []
    for value in values:
        parsed_budgets.append(tuple(parse_budget(b, budget_option) for b in value.split("+")))
    if not calibrates:
        for b in (b for bs in parsed_budgets for b in bs if isinstance(b, str)):
            adaptive = Budget.parse(b).value
            if adaptive.threshold is None and not adaptive.needs_no_threshold:
                raise InputError(
                    f"{budget_option} {b}: an adaptive budget needs its threshold here ({b}@T); `tokensieve eval "
                    f"--budgets {b}` fits one on the calibration split and records it in results.json (the record's "
                    "'adaptive' entry), or fit one in Python with Sieve.calibrate"
                )
    from ..methods import get_method  # needs torch: after every check that does not

    configs = []
    for chain in chains:
        names = tuple(n.strip().lower() for n in chain.split("+"))
        if any(not n for n in names):
            raise InputError(f"{method_option} {chain!r}: an empty name in the chain; write e.g. evocut+fastv")
        for n in names:
            if n != VANILLA:
                get_method(n)  # unknown names fail here, with the list of known methods
        if VANILLA in names:
            raise InputError(f"{method_option}: '{VANILLA}' (the full-token model) is always measured; leave it out")
        for b in parsed_budgets:
            if len(b) != len(names):
                example = "+".join(["192", "128", "64"][: len(names)]) if len(names) > 1 else "64"
                raise InputError(
                    f"{method_option} {chain} has {len(names)} stage(s) but {budget_option} {format_budget(b)} gives "
                    f"{len(b)} budget(s); give one budget per chained method, joined by '+' (e.g. {budget_option} "
                    f"{example})"
                )
            configs.append(Config(names, b))
    return configs


def parse_param(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` or ``METHOD.NAME=VALUE``; the value is read as a Python literal when it is one."""
    if "=" not in text:
        raise InputError(f"--param {text!r}: write METHOD.NAME=VALUE, e.g. --param fastv.layer=1")
    key, value = text.split("=", 1)
    key = key.strip()
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()
    return key, parsed


def group_params(items: list[tuple[str, object]], configs: list[Config]) -> dict[str, dict]:
    """``{method: {name: value}}`` from ``--param`` items, each tied to a method the command runs."""
    names = list(dict.fromkeys(m for c in configs for m in c.methods if m != VANILLA))
    out: dict[str, dict] = {}
    for key, value in items:
        method, dot, name = key.rpartition(".")
        if not dot:
            if len(names) != 1:
                owners = [m for m in names if key.strip() in method_parameters(m)] or names
                raise InputError(
                    f"--param {key}={value!r}: this command runs several methods ({', '.join(names)}); name the "
                    f"method, e.g. --param {owners[0]}.{key}={value!r}"
                )
            method = names[0]
        method = method.strip().lower()
        if method not in names:
            raise InputError(
                f"--param {key}={value!r}: {method!r} is not one of the methods of this command ({', '.join(names)}); "
                "write METHOD.NAME=VALUE with one of them"
            )
        name = name.strip()
        accepted = method_parameters(method)
        if name not in accepted:
            raise InputError(
                f"--param {key}={value!r}: {method} has no parameter {name!r}; it takes "
                f"{', '.join(accepted) or 'none'} (tokensieve methods {method} explains each)"
            )
        out.setdefault(method, {})[name] = value
    return out


def method_parameters(name: str) -> dict[str, object]:
    """A method's hyper-parameters and their defaults, read from its constructor."""
    from ..methods import get_method
    from ..plan import accepted_params

    return accepted_params(get_method(name))
