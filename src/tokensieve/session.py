"""Applying a method to a model: reversible, instance-level, and safe when a call fails.

Two things are attached to one model instance and nothing else: a forward pre-hook (so ``model(**batch)`` is
compressed) and an instance attribute ``generate`` shadowing the class method (generation must see the shrunk
prompt before it sizes its cache and positions, which no module hook can change). Both are removed by
:meth:`SieveHandle.remove`, which the context manager calls in ``finally``. Classes are never patched, so a
vanilla and a sieved model run side by side in one process.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .adapters import get_adapter
from .anyres import check_newlines
from .budget import Budget, Scope
from .errors import StageError, TokensieveError, UnsupportedModelError
from .llm_stage import KeepAll, LLMStage
from .methods import get_method, method_names
from .methods.base import IN_LLM, Method
from .report import SieveReport

_SIEVED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


class Sieve:
    """A method with its budget, ready to be applied to models.

    >>> sieve = Sieve("evocut", budget=64)          # 64 visual tokens per image
    >>> with sieve(model):
    ...     out = model.generate(**inputs, max_new_tokens=32)
    >>> sieve.last_report.summary()

    Stages chain in one sieve, one budget per method: ``Sieve(["evocut", "fastv"], budget=[192, 128])`` lets 192
    tokens per image into the LM (pre-LLM budgets count tokens entering the LM) and FastV brings the average over
    decoder layers to 128 (in-LLM budgets count layer-averaged visual tokens). At most one pre-LLM and one in-LLM
    method, in that order; ToDRE brings its own in-LLM rule and takes only its pre-LLM budget.

    ``newlines`` (LLaVA-NeXT-family images): which ``image_newline`` tokens follow selection: ``"rows"`` (default, the
    newline of each row that keeps a token), ``"all"`` or ``"none"`` (see ``tokensieve.anyres``).
    """

    def __init__(self, method, budget, *, scope: str | Scope = "image", newlines: str = "rows", **params):
        methods = list(method) if isinstance(method, (list, tuple)) else [method]
        if not methods:
            raise StageError("give at least one method")
        if len(methods) > 1 and params:
            raise TypeError(
                "keyword hyper-parameters apply to a single method; for a list pass Method instances, e.g. "
                "tokensieve.methods.get_method('fastv')(layer=3)"
            )
        instances = [_instantiate(m, params) for m in methods]
        if len(methods) == 1:
            budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget]
        elif not isinstance(budget, (list, tuple)):
            raise StageError(
                f"{len(methods)} methods need one budget each, e.g. budget=[192, 128] for "
                f"{[m.name for m in instances]} (pre-LLM: tokens entering the LM; in-LLM: layer-averaged visual tokens)"
            )
        else:
            budgets = list(budget)
        if len(budgets) != len(instances):
            raise StageError(f"got {len(budgets)} budget(s) for {len(instances)} method(s); give one per method")
        parsed = [Budget.parse(b, scope) for b in budgets]
        self.newlines = check_newlines(newlines)
        self.methods = instances
        self.pre_method, self.pre_budget, self.llm_method, self.llm_budget = _plan_stages(instances, parsed)
        self.method = instances[0]
        self.budget = parsed[0]
        self.last_report: SieveReport | None = None

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.methods)

    def apply(self, model) -> "SieveHandle":
        """Attach to ``model`` until ``handle.remove()``; prefer ``with sieve(model):``."""
        return SieveHandle(self, model)

    @contextmanager
    def __call__(self, model) -> Iterator["SieveHandle"]:
        handle = self.apply(model)
        try:
            yield handle
        finally:
            handle.remove()

    def __repr__(self) -> str:
        if len(self.methods) == 1:
            return f"Sieve({self.method!r}, budget={self.budget.value!r}, scope={self.budget.scope.value!r})"
        budgets = [b.value for b in ([self.pre_budget] if self.pre_method.name != KeepAll.name else [])]
        budgets += [self.llm_budget.value] if self.llm_budget is not None else []
        return f"Sieve({self.methods!r}, budget={budgets!r}, scope={self.budget.scope.value!r})"


def _instantiate(method, params: dict) -> Method:
    if isinstance(method, Method):
        if params:
            raise TypeError("pass hyper-parameters to the Method instance, not to Sieve, when giving an instance")
        return method
    cls = get_method(method)
    try:
        return cls(**params)
    except TypeError as exc:
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise TypeError(f"bad parameter for method {cls.name!r}: {exc}; it accepts {accepted}") from None


def _plan_stages(methods: list[Method], budgets: list[Budget]):
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
    if pre is None:
        pre, pre_budget = KeepAll(), Budget.parse(1.0, budgets[0].scope)
    if (
        llm_budget is not None and not pre_budget.is_ratio and not llm_budget.is_ratio
        and llm_budget.value > pre_budget.value
    ):
        raise StageError(
            f"the in-LLM budget ({llm_budget.value} layer-averaged visual tokens) exceeds the {pre_budget.value} "
            f"tokens {pre.name!r} lets into the LM"
        )
    return pre, pre_budget, llm, llm_budget


def _bind(fn, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Merge positional arguments into keyword arguments by the callee's parameter names."""
    if not args:
        return dict(kwargs)
    names = [n for n, p in inspect.signature(fn).parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"too many positional arguments for {fn.__name__}")
    merged = dict(zip(names, args))
    dup = set(merged) & set(kwargs)
    if dup:
        raise TypeError(f"{fn.__name__}() got multiple values for {sorted(dup)}")
    merged.update(kwargs)
    return merged


class SieveHandle:
    """The attachment of one :class:`Sieve` to one model; ``remove()`` restores the model exactly."""

    def __init__(self, sieve: Sieve, model) -> None:
        adapter = get_adapter(model)  # raises for unsupported models before anything is attached
        adapter.check_stage(sieve.pre_method)
        if sieve.llm_method is not None:
            companion = sieve.pre_method.llm_companion()
            try:
                adapter.check_stage(sieve.llm_method)
            except UnsupportedModelError as exc:
                if companion is None:
                    raise
                raise UnsupportedModelError(
                    f"{exc}. {sieve.pre_method.name!r} adds that in-LLM stage itself; switch it off with the method's "
                    "option (todre: relevance=False) to run its first stage alone"
                ) from None
        if sieve.newlines != "rows":
            if not hasattr(adapter, "newlines"):
                raise UnsupportedModelError(
                    f"newlines={sieve.newlines!r} is about LLaVA-NeXT-family images (their image_newline tokens); "
                    f"{type(model).__name__} has none"
                )
            adapter.newlines = sieve.newlines
        adapter.check_budget(sieve.pre_budget)
        if sieve.llm_budget is not None:
            adapter.check_budget(sieve.llm_budget)
        if model in _SIEVED:
            raise TokensieveError(
                f"this {type(model).__name__} already has a sieve applied; remove it first (one sieve per model)"
            )
        self.sieve = sieve
        self.adapter = adapter
        self._model = weakref.ref(model)
        self._generate = model.generate  # the class's bound method
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._forward_stage: LLMStage | None = None
        self._post_hook = model.register_forward_hook(self._post_forward, always_call=True)
        # generate() must receive the shrunk prompt itself; an instance attribute shadows the class method.
        # It carries the original's name, docstring and signature for tools that introspect generate().
        @functools.wraps(self._generate)
        def generate(*args, **kwargs):
            return self.generate(*args, **kwargs)

        self._instance_generate = generate
        model.generate = generate
        _SIEVED.add(model)
        self.active = True

    @property
    def last_report(self) -> SieveReport | None:
        return self.sieve.last_report

    def _prepare(self, kwargs: dict[str, Any]):
        sieve = self.sieve
        if sieve.llm_method is not None and kwargs.get("labels") is not None and kwargs.get("pixel_values") is not None:
            raise StageError(
                "labels cannot be used with an in-LLM stage: the LM's output no longer covers every input position"
            )
        new_kwargs, report = self.adapter.prepare(kwargs, sieve.pre_method, sieve.pre_budget, sieve.name)
        stage = None
        if report is not None:
            if sieve.llm_method is not None:
                stage = self._llm_stage(new_kwargs, report)
            self.sieve.last_report = report
        return new_kwargs, report, stage

    def _llm_stage(self, kwargs: dict[str, Any], report: SieveReport) -> LLMStage:
        """Arm the in-LLM method for this call's (possibly already shrunk) prompt."""
        sieve = self.sieve
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        counts: list[list[int]] = [[] for _ in range(ids.shape[0])]
        targets: list[list[int]] | None = None
        if sieve.llm_budget is not None and sieve.llm_method.budgeted:
            targets = [[] for _ in range(ids.shape[0])]
            for im, k in zip(report.images, self.adapter.llm_targets(sieve.llm_budget, report.images)):
                targets[im.sample].append(k)
        for im in report.images:
            counts[im.sample].append(im.tokens_out)
        stage = LLMStage(self.adapter, sieve.llm_method, targets, report.visual_index, mask, counts)
        report.llm_budget = str(sieve.llm_budget) if sieve.llm_budget is not None else f"{sieve.llm_method.name} rule"
        if isinstance(sieve.pre_method, KeepAll):
            report.stage, report.budget = IN_LLM, report.llm_budget
        else:
            report.stage = f"{sieve.pre_method.stage}+{IN_LLM}"
        return stage

    def _pre_forward(self, module, args, kwargs):
        if not args and not self.adapter.is_visual(kwargs):
            return None  # the common decoding-step case, without binding the signature each token
        merged = _bind(type(module).forward.__get__(module), args, kwargs)
        if not self.adapter.is_visual(merged):
            return None  # text-only call, or a decoding step of a sieved generate()
        new_kwargs, report, stage = self._prepare(merged)
        if stage is not None:
            stage.install()
            self._forward_stage = stage
        return (), new_kwargs

    def _post_forward(self, module, args, output):
        stage, self._forward_stage = self._forward_stage, None
        if stage is not None:
            stage.remove()
            if self.sieve.last_report is not None:
                stage.fill(self.sieve.last_report)
        return None

    def generate(self, *args, **kwargs):
        merged = _bind(self._generate, args, kwargs)
        if "inputs" in merged:
            inputs = merged.pop("inputs")
            if inputs is not None:
                if "input_ids" in merged:
                    raise TypeError("generate() got both `inputs` and `input_ids`")
                merged["input_ids"] = inputs
        if not self.adapter.is_visual(merged):
            return self._generate(**merged)
        original_ids = merged["input_ids"]
        # generate() itself runs without autograd; encoding and selection happen before it, so they must too
        with torch.no_grad():
            new_kwargs, report, stage = self._prepare(merged)
        if stage is None:
            out = self._generate(**new_kwargs)
        else:
            stage.install()
            try:
                out = self._generate(**new_kwargs)
            finally:
                stage.remove()
            stage.fill(report)
        return _restore_prompt(out, original_ids, report.seq_len_out)

    def remove(self) -> None:
        """Detach; safe to call twice."""
        if not self.active:
            return
        self._hook.remove()
        self._post_hook.remove()
        if self._forward_stage is not None:
            self._forward_stage.remove()
            self._forward_stage = None
        model = self._model()
        if model is not None:
            if model.__dict__.get("generate") is self._instance_generate:
                del model.__dict__["generate"]
            _SIEVED.discard(model)
        self.active = False

    def __enter__(self) -> "SieveHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _restore_prompt(out, original_ids: torch.Tensor, compressed_len: int):
    """Put the caller's own prompt back in front of the generated tokens.

    Callers slice ``out[:, input_ids.shape[1]:]`` to get the answer; with the compressed prompt left in place that
    slice would silently cut into the answer.
    """
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    reps = seq.shape[0] // original_ids.shape[0]
    prompt = original_ids.to(seq.device)
    if reps > 1:
        prompt = prompt.repeat_interleave(reps, dim=0)
    full = torch.cat([prompt, seq[:, compressed_len:]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    stage: str
    signals: tuple[str, ...]


def list_methods() -> list[MethodInfo]:
    """Every registered method with what it needs, for tables and CLIs."""
    out = []
    for name in method_names():
        cls = get_method(name)
        out.append(MethodInfo(cls.name, cls.description, cls.stage, tuple(cls.signals)))
    return out
