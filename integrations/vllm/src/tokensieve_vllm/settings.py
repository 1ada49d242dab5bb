"""Which method and budget an image runs under: the server default, overridden per request.

Settings are four keys (five on LLaVA-NeXT, whose ``newlines`` policy is "all" or "none"). Server-wide they come
from ``hf_overrides={"tokensieve": {"method": ..., "budget": ..., "params": {...}, "scope": ...}}`` and/or
``--mm-processor-kwargs '{"tokensieve_method": ..., ...}'`` (the latter wins); per request from the request's
``mm_processor_kwargs`` with the same ``tokensieve_*`` names (the server needs ``--trust-request-mm-kwargs``). A
request that names a different method than the server default starts from that method's own defaults (the server's
``params`` belong to the server's method). ``tokensieve_method: "none"`` switches selection off for a request.

Everything here is checked in the front end, before a request reaches the engine: a bad value is a 400 answer for
that request, never an exception inside the engine that would take the server down. The resolved :class:`SieveSpec`
travels with each image (it is part of the processor's output, hence of its cache entry).

Torch-only: tokensieve's own selectors, budget and errors; no vLLM import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tokensieve.budget import Budget, Scope
from tokensieve.errors import TokensieveError
from tokensieve.methods import get_method, method_names
from tokensieve.methods.base import IN_LLM, POST_PROJECTOR, PRE_PROJECTOR, EncoderMethod, Method

PREFIX = "tokensieve_"
FIELDS = ("method", "budget", "params", "scope", "newlines")
OFF = "none"


class SettingsError(ValueError):
    """A tokensieve setting that cannot run; ``parameter`` names the key, for the server's 400 answer."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class Family:
    """What the settings are checked against: one model's vision side."""

    name: str
    num_layers: int
    feature_layers: tuple[int, ...]
    """hidden_states indices (non-negative) whose patch rows make the features, concatenated in this order."""
    tokens: int
    """Visual tokens per image before selection (the candidates); the most an image can have where the count
    depends on the image (Qwen-VL), whose requests are checked again per image."""
    num_prefix: int = 0
    """Leading candidates that are not patches (CLS under LLaVA's ``full`` strategy)."""
    scopes: tuple[str, ...] = (Scope.IMAGE.value,)
    stages: tuple[str, ...] = (PRE_PROJECTOR, POST_PROJECTOR)
    newlines: tuple[str, ...] = ()
    """Newline policies (``tokensieve.engine.anyres``) the family takes, the default first; empty: no newline tokens."""
    stage_notes: dict[str, str] = field(default_factory=dict)
    """Why a stage is missing, by stage name, for the refusal message."""

    @property
    def feature_layer(self) -> int:
        """The feature layer methods read (the last one listed), as tokensieve's adapters define it."""
        return self.feature_layers[-1]


@dataclass(frozen=True)
class SieveSpec:
    """A validated setting for one image: method, its parameters and the resolved token count ``k``."""

    method: str
    k: int
    tokens: int
    params: dict[str, Any] = field(default_factory=dict)
    budget: int | float | None = None
    """The budget as given (LLaVA-NeXT splits it over an image's crops itself); ``k`` is what the image keeps."""
    scope: str = Scope.IMAGE.value
    newlines: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "method": self.method,
                "k": self.k,
                "tokens": self.tokens,
                "params": self.params,
                "budget": self.budget,
                "scope": self.scope,
                "newlines": self.newlines,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> SieveSpec:
        d = json.loads(text)
        return cls(
            d["method"],
            int(d["k"]),
            int(d["tokens"]),
            d["params"],
            d.get("budget"),
            d.get("scope", Scope.IMAGE.value),
            d.get("newlines"),
        )

    def build(self) -> Method:
        return _build(self.method, json.dumps(self.params, sort_keys=True))


@lru_cache(maxsize=64)
def _build(name: str, params_json: str) -> Method:
    return get_method(name)(**json.loads(params_json))


def split_kwargs(kwargs: Mapping[str, object] | None) -> tuple[dict[str, object], dict[str, object]]:
    """``(tokensieve settings by field, every other processor kwarg)``; an unknown ``tokensieve_*`` key is an error."""
    ours: dict[str, object] = {}
    rest: dict[str, object] = {}
    for key, value in (kwargs or {}).items():
        if isinstance(key, str) and key.startswith(PREFIX):
            name = key[len(PREFIX) :]
            if name not in FIELDS:
                raise SettingsError(
                    f"unknown tokensieve setting {key!r}; use {', '.join(PREFIX + f for f in FIELDS)}", key
                )
            ours[name] = value
        else:
            rest[key] = value
    return ours, rest


def server_settings(hf_config, mm_processor_kwargs: Mapping[str, object] | None) -> dict[str, object]:
    """The server default: ``hf_overrides``' ``tokensieve`` entry, then ``--mm-processor-kwargs`` on top."""
    base = getattr(hf_config, "tokensieve", None) or {}
    if not isinstance(base, Mapping):
        raise SettingsError(
            f"hf_overrides 'tokensieve' must be a mapping of {list(FIELDS)}, got {base!r}", "tokensieve"
        )
    unknown = sorted(set(base) - set(FIELDS))
    if unknown:
        raise SettingsError(f"unknown key(s) {unknown} in hf_overrides 'tokensieve'; use {list(FIELDS)}", "tokensieve")
    ours, _ = split_kwargs(mm_processor_kwargs)
    return merge(dict(base), ours)


def merge(server: Mapping[str, object], request: Mapping[str, object]) -> dict[str, object]:
    """Request fields override the server's; the server's ``params`` carry over only for the server's method."""
    out = dict(server)
    if "method" in request and _norm(request["method"]) != _norm(server.get("method")):
        out.pop("params", None)
    for key, value in request.items():
        if key == "params" and isinstance(value, Mapping) and isinstance(out.get("params"), Mapping):
            out["params"] = {**out["params"], **value}
        else:
            out[key] = value
    return out


def _norm(name) -> object:
    return name.strip().lower() if isinstance(name, str) else name


def refusal(method: Method, family: Family, suggest: bool = True) -> str | None:
    """Why ``method`` cannot run under vLLM on ``family``, or ``None`` when it can."""
    name = method.name
    if method.stage == IN_LLM:
        return (
            f"method {name!r} runs inside the language model (in-LLM): it drops visual tokens between decoder "
            "layers after the LM has read them. vLLM fixes each request's placeholder count, and with it the KV "
            "cache it allocates and every position, before the LM runs, so such a method cannot shrink a request "
            "there." + (f" Use a pre-LLM method: {', '.join(runnable_methods(family))}" if suggest else "")
        )
    if method.llm_companion() is not None:
        return (
            f"method {name!r} adds its own in-LLM stage after selecting, which vLLM cannot run (it sizes each "
            'request\'s KV cache before the LM runs); pass tokensieve_params={"relevance": false} to run its '
            "first (pre-LLM) stage alone"
        )
    if method.stage not in family.stages:
        why = family.stage_notes.get(method.stage)
        return (
            f"method {name!r} runs {method.stage.replace('_', '-')}, which tokensieve-vllm does not support on "
            f"{family.name} (supported stages: {', '.join(family.stages)})" + (f": {why}" if why else "")
        )
    return None


def runnable_methods(family: Family) -> list[str]:
    """Registered methods that run on ``family`` with their default parameters."""
    out = []
    for name in method_names():
        try:
            method = get_method(name)()
        except (TypeError, ValueError):
            continue
        if refusal(method, family, suggest=False) is None:
            out.append(name)
    return out


def resolve(settings: Mapping[str, object], family: Family, tokens: int | None = None) -> SieveSpec | None:
    """Check merged settings against ``family``; ``None`` when no method is set (the stock model's tokens).

    ``tokens``: this image's candidate count, where it depends on the image (default: ``family.tokens``).
    """
    name = settings.get("method")
    if name is None or _norm(name) == OFF:
        return None
    if not isinstance(name, str):
        raise SettingsError(f"tokensieve_method must be a method name (a string), got {name!r}", PREFIX + "method")
    params = settings.get("params") or {}
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise SettingsError(
            f"tokensieve_params must be a mapping of parameter names to values, got {params!r}", PREFIX + "params"
        )
    try:
        cls = get_method(name)
    except TokensieveError as exc:
        raise SettingsError(str(exc), PREFIX + "method") from None
    try:
        method = cls(**params)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"bad tokensieve_params for method {cls.name!r}: {exc}", PREFIX + "params") from None
    why = refusal(method, family)
    if why is not None:
        raise SettingsError(why, PREFIX + "method")
    if "budget" not in settings or settings["budget"] is None:
        raise SettingsError(
            f"method {cls.name!r} needs a budget: tokensieve_budget as an int (tokens kept per image, at most "
            f"{family.tokens}) or a float in (0, 1] (keep ratio)",
            PREFIX + "budget",
        )
    scope = settings.get("scope") or Scope.IMAGE.value
    if scope not in family.scopes:
        raise SettingsError(
            f"budget scope {scope!r} is not supported on {family.name} under vLLM; use one of {list(family.scopes)} "
            "(a budget there is a fixed count per image, or a keep ratio of the image's tokens)",
            PREFIX + "scope",
        )
    newlines = settings.get("newlines")
    if newlines is not None and newlines not in family.newlines:
        raise SettingsError(
            f"tokensieve_newlines {newlines!r} is not supported on {family.name}; "
            + (f"use one of {list(family.newlines)}" if family.newlines else "it has no newline tokens"),
            PREFIX + "newlines",
        )
    newlines = newlines or (family.newlines[0] if family.newlines else None)
    n = family.tokens if tokens is None else tokens
    what = f"each image of this {family.name} model" if tokens is None else f"this image ({family.name})"
    try:
        budget = Budget.parse(settings["budget"], scope)
        if budget.is_adaptive:
            raise SettingsError(
                "adaptive budgets are not available under vLLM: the front end must know each image's token count "
                "before the encoder runs, and an adaptive count is read off the encoder's features; give an int or "
                "a keep ratio",
                PREFIX + "budget",
            )
        k = budget.resolve(n, what=what)
    except TokensieveError as exc:
        raise SettingsError(str(exc), PREFIX + "budget") from None
    try:  # layer parameters are checked against the real depth here, not inside the engine
        if isinstance(method, EncoderMethod):
            if k - family.num_prefix < 1:
                raise ValueError(f"{cls.name} keeps CLS and at least one patch; a budget of {k} leaves no patch")
            method.plan(family.num_layers, min(family.feature_layers))
        else:
            method.request(family.num_layers, family.feature_layer)
    except ValueError as exc:
        raise SettingsError(f"bad tokensieve_params for method {cls.name!r}: {exc}", PREFIX + "params") from None
    return SieveSpec(cls.name, k, n, dict(params), budget.value, budget.scope.value, newlines)


__all__ = [
    "SettingsError",
    "Family",
    "SieveSpec",
    "split_kwargs",
    "server_settings",
    "merge",
    "resolve",
    "refusal",
    "runnable_methods",
]
