"""What ``--model_args`` mean: importable without lmms-eval, so the core install (and its tests) can check them.

The rules behind them are :mod:`tokensieve.plan`'s, through :class:`~tokensieve.Sieve`; here only lmms-eval's syntax
is read (``method=evocut+fastv,budget=192+128``, ``METHOD.NAME=VALUE``, ``pretrained=``).
"""

from __future__ import annotations

from pathlib import Path

from ..models.loading import EMBEDDED_MODELS as _EMBEDDED

EMBEDDED_MODELS = {name: entry.path for name, entry in _EMBEDDED.items() if entry.path is not None}
"""Names ``pretrained=`` accepts besides a directory: the models shipped inside the package (one table for the
command line and lmms-eval: :data:`tokensieve.models.loading.EMBEDDED_MODELS`)."""


def resolve_pretrained(name: str) -> Path | str:
    """What ``pretrained=`` names: an embedded model, a local model directory, or else a hub id for transformers.

    A hub id loads from the local cache only under the launcher's offline mode (``HF_HUB_OFFLINE=0`` lets
    transformers download it, where the machine can).
    """
    if str(name) in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[str(name)]
    path = Path(str(name)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"pretrained={name}: the directory has no config.json (embedded models: {sorted(EMBEDDED_MODELS)})"
            )
        return path
    return str(name)


def _parse_budget(value):
    """``64`` / ``0.25`` as lmms-eval parsed them; ``"192+128"`` for chained stages becomes ``[192, 128]``."""
    if isinstance(value, str) and "+" in value:
        return [_parse_budget(part.strip()) for part in value.split("+")]
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value  # anything else is left for Budget.parse to refuse with its own message


def build_sieve(method: str, budget, scope: str, params: dict[str, dict]):
    """The :class:`~tokensieve.Sieve` of ``method`` (``None`` for ``none``), validated before any model is loaded."""
    from ..session import Sieve

    names = [m.strip() for m in str(method).split("+")]
    stray = sorted(set(params) - set(names))
    if method == "none":
        if budget is not None or params:
            raise ValueError("method=none runs the unpruned model: drop budget= and METHOD.NAME= arguments")
        return None
    if stray:
        raise ValueError(
            f"parameters for {stray} but method={method}; write them METHOD.NAME=VALUE for a method in use"
        )
    if budget is None:
        raise ValueError(f"method={method} needs budget= (an int: tokens per {scope}; a float: keep ratio)")
    budgets = _parse_budget(budget)
    return Sieve.from_names(names, budgets if isinstance(budgets, list) else [budgets], scope=scope, params=params)


def method_params(kwargs: dict) -> dict[str, dict]:
    """``{method: {parameter: value}}`` from the ``METHOD.NAME=VALUE`` model arguments; anything else is refused."""
    params: dict[str, dict] = {}
    for key, value in kwargs.items():
        name, dot, param = key.partition(".")
        if not dot or not name or not param:
            raise TypeError(
                f"unknown model argument {key}={value!r}; method hyper-parameters are written "
                "METHOD.NAME=VALUE (e.g. evocut.start_layer=10)"
            )
        params.setdefault(name, {})[param] = value
    return params
