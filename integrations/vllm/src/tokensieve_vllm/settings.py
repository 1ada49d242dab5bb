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

The rules are tokensieve's own (``tokensieve.plan``, the rule set ``Sieve`` and the lmms-eval wrapper use too), so a
setting is refused here with the text ``Sieve`` would give; the plugin only narrows each family's facts to what vLLM
can run (:func:`served`). No vLLM import: the front end's checks run (and are tested) without an engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tokensieve import plan
from tokensieve.adapters import LlavaAdapter, LlavaNextAdapter, QwenVLAdapter
from tokensieve.budget import Budget, Scope
from tokensieve.errors import BudgetError, TokensieveError, UnknownMethodError
from tokensieve.methods import get_method
from tokensieve.methods.base import IN_ENCODER, IN_LLM, POST_PROJECTOR, PRE_PROJECTOR, Method
from tokensieve.methods.encoder import check_patch_target
from tokensieve.plan import Target

PREFIX = "tokensieve_"
FIELDS = ("method", "budget", "params", "scope", "newlines")
OFF = "none"
HOST = "tokensieve-vllm"

IN_LLM_NOTE = (
    "vLLM fixes each request's placeholder count, and with it the KV cache it allocates and every position, before "
    "the LM runs, so a method that drops visual tokens between decoder layers cannot shrink a request there"
)
ADAPTIVE_NOTE = (
    "the front end must know each image's token count before the encoder runs, and an adaptive count is read off "
    "the encoder's features"
)


class SettingsError(ValueError):
    """A tokensieve setting that cannot run; ``parameter`` names the key, for the server's 400 answer."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


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


def served(target: Target, *, stages: tuple[str, ...], **changes) -> Target:
    """A family's facts (``Adapter.describe``) narrowed to what this plugin serves: vLLM never runs in-LLM stages or
    adaptive budgets (reasons in ``notes``, so refusals give them), and each family module names its own stages,
    scopes, token limits and newline policies."""
    notes = {IN_LLM: IN_LLM_NOTE, "adaptive": ADAPTIVE_NOTE, **changes.pop("notes", {})}
    return target.narrowed(host=HOST, stages=stages, adaptive=False, notes=notes, **changes)


SERVED_BY = {
    "llava": "TokenSieveLlavaForConditionalGeneration",
    "llava_next": "TokenSieveLlavaNextForConditionalGeneration",
    "qwen2_5_vl": "TokenSieveQwen2_5_VLForConditionalGeneration",
}
"""model_type -> the plugin architecture that serves it."""


def check_model_type(arch: str, config) -> None:
    """Refuse, at start-up, a model this architecture does not serve, naming the one that does (if any)."""
    model_type = getattr(config, "model_type", None)
    if SERVED_BY.get(model_type) == arch:
        return
    served_types = [t for t, a in SERVED_BY.items() if a == arch]
    other = SERVED_BY.get(model_type)
    raise ValueError(
        f"{arch} serves model_type {served_types[0]!r}; this model is {model_type or type(config).__name__!r}, "
        + (
            f"served by {other} (put that name in hf_overrides)"
            if other
            else "which tokensieve-vllm does not support yet. Serve it under its stock architecture (drop the "
            "hf_overrides architecture)"
        )
    )


def _clip_tower(arch: str, config) -> None:
    from transformers import CLIPVisionConfig

    vc = config.vision_config
    if not isinstance(vc, CLIPVisionConfig):
        raise ValueError(
            f"{arch} supports a CLIP vision tower; this model has {type(vc).__name__}. Serve it under its stock "
            "architecture (drop the hf_overrides architecture)"
        )


def llava_target(config) -> Target:
    """LLaVA-1.5 as served: pre-/post-projector and in-encoder methods; refuses other families, towers, strategies."""
    arch = SERVED_BY["llava"]
    check_model_type(arch, config)
    _clip_tower(arch, config)
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported; use 'default' or 'full'")
    return served(LlavaAdapter.describe(config), stages=(PRE_PROJECTOR, POST_PROJECTOR, IN_ENCODER))


def next_target(config, most_crops: int) -> Target:
    """LLaVA-NeXT as served: the newline policy fixes each image's count before selection ("all" or "none"), and an
    image has at most ``most_crops`` crops (the host's own anyres grid rule decides)."""
    arch = SERVED_BY["llava_next"]
    check_model_type(arch, config)
    _clip_tower(arch, config)
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not supported on "
            "LLaVA-NeXT: its packing assumes the CLS token is dropped ('default')"
        )
    core = LlavaNextAdapter.describe(config)
    per_crop = core.limits[Scope.CROP]
    return served(
        core,
        stages=(PRE_PROJECTOR, POST_PROJECTOR),
        limits={Scope.IMAGE: per_crop * most_crops, Scope.CROP: per_crop},
        newlines=("all", "none"),
        notes={
            IN_ENCODER: "the encoder sees whole crops and unpadding drops kept patches afterwards, so an image's "
            "token count is only known after the encoder, and vLLM needs it before"
        },
    )


def qwen_target(config, max_tokens: int) -> Target:
    """Qwen2.5-VL as served: images only, a budget per image (an image's count is its own grid's)."""
    check_model_type(SERVED_BY["qwen2_5_vl"], config)
    return served(
        QwenVLAdapter.describe(config),
        stages=(PRE_PROJECTOR, POST_PROJECTOR),
        scopes=(Scope.IMAGE,),
        limits={Scope.IMAGE: max_tokens},
        notes={IN_ENCODER: "tokensieve's Qwen cutter drives transformers' ViT blocks and is not ported to vLLM's"},
    )


def runnable_methods(target: Target) -> list[str]:
    """Registered methods that run on ``target`` with their default parameters."""
    return plan.runnable(target)


def resolve(settings: Mapping[str, object], target: Target, tokens: int | None = None) -> SieveSpec | None:
    """Check merged settings against ``target``; ``None`` when no method is set (the stock model's tokens).

    ``tokens``: this image's candidate count, where it depends on the image (default: ``target.tokens``, the most
    an image has). Every check and message is :mod:`tokensieve.plan`'s; a refusal carries the setting it is about.
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
        method = plan.make_method(name, params)
    except UnknownMethodError as exc:
        raise SettingsError(str(exc), PREFIX + "method") from None
    except TokensieveError as exc:
        raise SettingsError(str(exc), PREFIX + "params") from None
    why = plan.refusal(method, target)
    if why is not None:
        raise SettingsError(why, PREFIX + "method")
    if settings.get("budget") is None:
        raise SettingsError(
            f"method {method.name!r} needs a budget: tokensieve_budget as an int (tokens kept per image, at most "
            f"{target.tokens}) or a float in (0, 1] (keep ratio)",
            PREFIX + "budget",
        )
    scope = settings.get("scope") or Scope.IMAGE.value
    try:
        budget = Budget.parse(settings["budget"], scope)
        plan.check_budget(budget, target)
        n = target.tokens if tokens is None else tokens
        k = budget.resolve(n, what="each image of this model" if tokens is None else "this image")
        if method.stage == IN_ENCODER:
            check_patch_target(method.name, k, target.num_prefix)
    except TokensieveError as exc:
        wrong_scope = isinstance(exc, BudgetError) and "scope" in str(exc) and scope not in target.scopes
        raise SettingsError(str(exc), PREFIX + ("scope" if wrong_scope else "budget")) from None
    newlines = settings.get("newlines")
    try:
        if newlines is not None:
            plan.check_newlines(newlines, target)
        plan.check_layers(method, target)
        plan.check_signals(method, target)
    except TokensieveError as exc:
        raise SettingsError(
            str(exc), PREFIX + ("newlines" if newlines is not None and newlines not in target.newlines else "params")
        ) from None
    newlines = newlines or (target.newlines[0] if target.newlines else None)
    return SieveSpec(method.name, k, n, dict(params), budget.value, budget.scope.value, newlines)


__all__ = [
    "SettingsError",
    "SieveSpec",
    "split_kwargs",
    "server_settings",
    "merge",
    "resolve",
    "served",
    "llava_target",
    "next_target",
    "qwen_target",
    "runnable_methods",
    "check_model_type",
    "SERVED_BY",
]
