"""The one rule set: what a sieve setting means, and every refusal with its one message.

Three front doors take a setting (methods, budgets, scope, hyper-parameters) from users: :class:`~tokensieve.Sieve`
in transformers, the lmms-eval wrapper's ``--model_args`` and the vLLM plugin's ``tokensieve_*`` request keys. Each
builds its methods with :func:`make_method`, splits them into stages with :func:`plan_stages` and checks the result
against a :class:`Target` with :func:`check` (or, per method and budget, :func:`refusal`, :func:`check_layers` and
:func:`check_budget`). The functions are the same for all three, so one bad setting gets one message whichever door
it came through; only the syntax around it (a Python call, ``METHOD.NAME=VALUE``, a JSON request) is the door's.

A :class:`Target` is one model as one host runs it. A family adapter describes a transformers model
(``Adapter.target()``); the vLLM plugin narrows that description to what its engine can do (fewer stages, with the
reason in ``notes``), so the refusal names the host and its reason.

Torch-only (no transformers import): the vLLM environment imports this next to another transformers.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from .budget import Budget, Scope
from .engine.llm_stage import KeepAll
from .errors import BudgetError, ParameterError, StageError, TokensieveError, UnsupportedModelError
from .methods.base import IN_ENCODER, IN_LLM, POST_PROJECTOR, PRE_PROJECTOR, Method
from .methods.registry import get_method, method_names

HOST = "tokensieve"
"""The host that runs a :class:`Target` unless the target says otherwise (``tokensieve-vllm``)."""

STAGE_NAMES = {
    PRE_PROJECTOR: "pre-projector",
    POST_PROJECTOR: "post-projector",
    IN_ENCODER: "in-encoder",
    IN_LLM: "in-LLM",
}
"""How messages name the stages."""


@dataclass(frozen=True)
class Target:
    """What a setting is checked against: one model's vision and language sides, as one host runs them.

    ``feature_layers``: the non-negative ``hidden_states`` indices the features are made of (selectors read the last;
    in-encoder cuts must end before the first). ``limits``: the most visual tokens one unit of a scope can have where
    that is known before a call (an int budget above it can never run); where a unit's count depends on the input
    (anyres images, Qwen-VL resolutions) it is checked per call instead. ``notes``: why a stage is missing, by stage,
    for the refusal.
    """

    family: str
    model: str
    encoder_layers: int
    feature_layers: tuple[int, ...]
    llm_layers: int
    stages: tuple[str, ...] = (PRE_PROJECTOR, POST_PROJECTOR)
    scopes: tuple[Scope, ...] = (Scope.IMAGE,)
    signal_kinds: tuple[str, ...] = ("hidden_states", "cls_attention", "keys", "cls_hidden")
    limits: Mapping[Scope, int] = field(default_factory=dict)
    num_prefix: int = 0
    newlines: tuple[str, ...] = ()
    """Newline policies the model takes (``tokensieve.engine.anyres``), the default first; empty: no newline tokens."""
    adaptive: bool = True
    host: str = HOST
    notes: Mapping[str, str] = field(default_factory=dict)

    @property
    def feature_layer(self) -> int:
        """The ``hidden_states`` index selectors read."""
        return self.feature_layers[-1]

    @property
    def tokens(self) -> int | None:
        """Visual tokens of one image before selection, where every image has the same count (or the most one has)."""
        return self.limits.get(Scope.IMAGE)

    def narrowed(self, **changes) -> Target:
        """This target with some facts replaced: what a host that runs less of the model can do."""
        return replace(self, **changes)

    def depth(self, method: Method) -> tuple[int, int | None]:
        """``(layers, feature hidden_states index)`` a method's layer parameters are checked against."""
        if method.stage == IN_LLM:
            return self.llm_layers, None
        if method.stage == IN_ENCODER:  # cuts must end before the first layer the features are read from
            return self.encoder_layers, min(self.feature_layers)
        return self.encoder_layers, self.feature_layer


# -- methods ---------------------------------------------------------------------------------------------------


def accepted_params(cls: type[Method]) -> dict[str, object]:
    """A method's hyper-parameters and their defaults, read from its constructor."""
    sig = inspect.signature(cls.__init__)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def make_method(method: str | Method, params: Mapping[str, object] | None = None) -> Method:
    """The method named ``method`` built with ``params``; a bad name or parameter fails here, naming it.

    A parameter the method does not have is refused before the constructor runs (listing the ones it has); a value
    its constructor refuses keeps the constructor's own explanation.
    """
    params = dict(params or {})
    if isinstance(method, Method):
        if params:
            raise ParameterError("pass hyper-parameters to the Method instance, not to Sieve, when giving an instance")
        return method
    cls = get_method(method)
    accepted = accepted_params(cls)
    unknown = [name for name in params if name not in accepted]
    if unknown:
        raise ParameterError(
            f"bad parameter for method {cls.name!r}: it has no parameter {', '.join(map(repr, unknown))}; it accepts "
            f"{', '.join(accepted) or 'none'}"
        )
    try:
        return cls(**params)
    except TokensieveError:
        raise
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"bad parameter for method {cls.name!r}: {exc}") from None


# -- stages ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stages:
    """The stages of one sieve: one method before the LM (a keep-all stand-in when none is given), at most one in it.

    ``llm_budget`` is ``None`` when the in-LLM method decides its counts itself (ToDRE's relevance rule).
    """

    pre: Method
    pre_budget: Budget
    llm: Method | None = None
    llm_budget: Budget | None = None

    @property
    def companion(self) -> bool:
        """The in-LLM stage is the pre-LLM method's own second stage (ToDRE), not a method the user chained."""
        return self.llm is not None and self.pre.llm_companion() is not None

    @property
    def budgets(self) -> list[Budget]:
        return [b for b in (self.pre_budget, self.llm_budget) if b is not None]


def plan_stages(methods: Sequence[Method], budgets: Sequence[Budget]) -> Stages:
    """Split methods into one pre-LLM and one in-LLM stage, in that order; explain every refusal."""
    pre = llm = None
    pre_budget = llm_budget = None
    for m, b in zip(methods, budgets):
        if m.stage == IN_LLM:
            if llm is not None:
                raise StageError(f"only one in-LLM method per sieve: got {llm.name!r} and {m.name!r}")
            llm, llm_budget = m, b
        else:
            if llm is not None:
                raise StageError(
                    f"{m.name!r} ({m.stage}) runs before the LM, so it must come before the in-LLM method {llm.name!r}"
                )
            if pre is not None:
                raise StageError(
                    f"only one method per pre-LLM stage: got {pre.name!r} and {m.name!r}; chain a pre-LLM method "
                    "with an in-LLM one instead"
                )
            pre, pre_budget = m, b
    companion = pre.llm_companion() if pre is not None else None
    if companion is not None:
        if llm is not None:
            raise StageError(f"{pre.name!r} runs its own in-LLM stage; it cannot be combined with {llm.name!r}")
        llm = companion
    if llm is not None and not llm.budgeted:
        llm_budget = None
    if llm_budget is not None and llm_budget.is_adaptive and pre_budget is not None and pre_budget.is_adaptive:
        raise StageError(
            "one adaptive budget per sieve (calibrate() fits one threshold): make either the pre-LLM or the in-LLM "
            "budget an int or a ratio"
        )
    if pre is not None and pre_budget.is_adaptive and pre.stage == IN_ENCODER:
        raise StageError(
            f"{pre.name!r} cuts inside the vision encoder on a schedule fixed before the encoder runs, while an "
            "adaptive count is read off the features the encoder produces; use an int or a ratio budget, or a "
            "method that selects after the encoder"
        )
    if pre is not None and pre_budget.is_adaptive and not pre.any_count:
        raise StageError(
            f"{pre.name!r} cannot keep an arbitrary number of tokens (its count must fit a pooled grid), so it "
            "cannot follow an adaptive budget; use an int or a ratio"
        )
    if pre is None:
        pre, pre_budget = KeepAll(), Budget.parse(1.0, budgets[0].scope)
    if (
        llm_budget is not None
        and not pre_budget.is_ratio
        and not llm_budget.is_ratio
        and not pre_budget.is_adaptive
        and not llm_budget.is_adaptive
        and llm_budget.value > pre_budget.value
    ):
        raise StageError(
            f"the in-LLM budget ({llm_budget.value} layer-averaged visual tokens) exceeds the {pre_budget.value} "
            f"tokens {pre.name!r} lets into the LM"
        )
    return Stages(pre, pre_budget, llm, llm_budget)


# -- checks against a target -----------------------------------------------------------------------------------


def runnable(target: Target) -> list[str]:
    """Registered methods whose stage runs on ``target`` with their default parameters."""
    out = []
    for name in method_names():
        try:
            method = get_method(name)()
        except (TypeError, ValueError):
            continue
        if refusal(method, target, suggest=False) is None:
            out.append(name)
    return out


def refusal(method: Method, target: Target, suggest: bool = True) -> str | None:
    """Why ``method``'s stage cannot run on ``target``, or ``None`` when it can (layers and signals aside).

    ``suggest``: name the methods that do run there."""
    name, stage = method.name, method.stage
    if stage not in target.stages:
        why = target.notes.get(stage)
        return (
            f"method {name!r} runs {STAGE_NAMES[stage]}, which {target.host} does not support on {target.family} "
            f"(supported stages: {', '.join(STAGE_NAMES[s] for s in target.stages)})"
            + (f": {why}" if why else "")
            + (f"; pick a method of those stages: {', '.join(runnable(target))}" if suggest else "")
        )
    if method.llm_companion() is not None and IN_LLM not in target.stages:
        why = target.notes.get(IN_LLM)
        switch = method.companion_switch
        return (
            f"method {name!r} adds its own in-LLM stage after selecting, which {target.host} does not run on "
            f"{target.family}"
            + (f": {why}" if why else "")
            + (f"; set its parameter {switch}=False to run its first stage alone" if switch else "")
        )
    return None


def check_layers(method: Method, target: Target) -> None:
    """A layer one of the method's parameters names must exist on the target: encoder layers against its vision
    encoder, decoder layers (in-LLM methods) against its LM. Refused before any call."""
    layers, feature_layer = target.depth(method)
    if method.stage == IN_LLM:
        where = f"its language model has {layers} decoder layers"
    else:
        where = (
            f"its vision encoder has {layers} layers (0..{layers - 1}) and the features are "
            f"hidden_states[{feature_layer}], the output of layer {feature_layer - 1}"
        )
    try:
        method.check_depth(layers, feature_layer)
    except ValueError as exc:
        raise ParameterError(f"method {method.name!r} does not fit this {target.model}: {exc} ({where})") from None


def check_signals(method: Method, target: Target) -> None:
    """The signals a pre-LLM method asks for must be ones the target's adapter can fill."""
    if method.stage == IN_LLM:
        return
    request = method.request(*target.depth(method)) if method.stage != IN_ENCODER else None
    if request is None:
        return
    missing = [f.name for f in fields(request) if getattr(request, f.name) and f.name not in target.signal_kinds]
    if missing:
        raise UnsupportedModelError(
            f"method {method.name!r} needs {', '.join(missing)}, which the {target.family} adapter does not provide yet"
        )


def check_method(method: Method, target: Target) -> None:
    """Stage, layers and signals of one method on ``target``."""
    why = refusal(method, target)
    if why is not None:
        raise UnsupportedModelError(why)
    check_layers(method, target)
    check_signals(method, target)


def check_budget(budget: Budget, target: Target, *, need_threshold: bool = True) -> None:
    """A budget's scope must exist on the target, and an int may not exceed what a unit of that scope ever has.

    ``need_threshold=False``: an adaptive budget is about to be calibrated, so a missing threshold is expected."""
    if budget.scope not in target.scopes:
        raise BudgetError(
            f"budget scope {budget.scope.value!r} is not supported on {target.family}"
            + ("" if target.host == HOST else f" under {target.host}")
            + f"; use one of {[s.value for s in target.scopes]}"
        )
    if budget.is_adaptive and not target.adaptive:
        why = target.notes.get("adaptive")
        raise BudgetError(
            f"adaptive budgets are not available under {target.host}"
            + (f": {why}" if why else "")
            + "; give an int or a keep ratio"
        )
    limit = target.limits.get(budget.scope)
    if limit is not None:
        budget.resolve(limit, what=f"each {budget.scope.value} of this model")
    if need_threshold and budget.is_adaptive and not budget.value.needs_no_threshold and budget.value.threshold is None:
        raise BudgetError(
            f"the adaptive budget {budget} has no threshold yet: call sieve.calibrate(model, batches) on a few "
            "representative batches first (the mean is fitted on them; each image's count then depends on that "
            "image alone), or give an earlier calibration's threshold (Adaptive(..., threshold=t), or the text "
            "adaptive:MEAN@t)"
        )


def check_newlines(newlines: str, target: Target) -> None:
    """A newline policy other than the default needs a model with newline tokens that takes it."""
    if newlines == "rows" and (not target.newlines or "rows" in target.newlines):
        return
    if not target.newlines:
        raise UnsupportedModelError(
            f"newlines {newlines!r} is about LLaVA-NeXT-family images (their image_newline tokens): {target.model} "
            "has no newline tokens"
        )
    if newlines not in target.newlines:
        raise UnsupportedModelError(
            f"newlines {newlines!r} is not supported on {target.family}"
            + ("" if target.host == HOST else f" under {target.host}")
            + f"; use one of {list(target.newlines)}"
        )


def check(stages: Stages, target: Target, newlines: str = "rows", *, calibrating: bool = False) -> None:
    """Everything about a planned sieve that can be known before a call, checked against ``target``.

    ``calibrating``: the sieve is about to fit its adaptive threshold (``Sieve.calibrate``), so a missing one is
    not an error yet.
    """
    for method in (stages.pre, stages.llm):
        if method is None or isinstance(method, KeepAll):
            continue
        try:
            check_method(method, target)
        except UnsupportedModelError as exc:
            if method is stages.llm and stages.companion:
                raise UnsupportedModelError(
                    f"{exc}. {stages.pre.name!r} adds that in-LLM stage itself; switch it off with "
                    f"{stages.pre.companion_switch}=False to run its first stage alone"
                ) from None
            raise
    check_newlines(newlines, target)
    for budget in stages.budgets:
        check_budget(budget, target, need_threshold=not calibrating)
