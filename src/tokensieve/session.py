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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from . import plan
from .adapters import get_adapter
from .adaptive import Calibration, fit, llm_counts, lm_input_features, recording
from .budget import Budget, Scope
from .engine.anyres import check_newlines
from .engine.llm_stage import KeepAll, LLMStage
from .errors import BudgetError, ParameterError, StageError, TokensieveError
from .methods import get_method, method_names
from .methods.base import IN_LLM
from .report import SieveReport

_SIEVED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


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
    newline of each row that keeps a token), ``"all"`` or ``"none"`` (see ``tokensieve.engine.anyres``).
    """

    def __init__(self, method, budget, *, scope: str | Scope = "image", newlines: str = "rows", **params):
        methods = list(method) if isinstance(method, (list, tuple)) else [method]
        if not methods:
            raise StageError("give at least one method")
        if len(methods) > 1 and params:
            raise ParameterError(
                "keyword hyper-parameters apply to a single method; for a list pass Method instances, e.g. "
                "tokensieve.methods.get_method('fastv')(layer=3), or use Sieve.from_names"
            )
        instances = [plan.make_method(m, params) for m in methods]
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
        stages = plan.plan_stages(instances, parsed)
        self.pre_method, self.pre_budget, self.llm_method, self.llm_budget = (
            stages.pre,
            stages.pre_budget,
            stages.llm,
            stages.llm_budget,
        )
        self.method = instances[0]
        self.budget = parsed[0]
        self.last_report: SieveReport | None = None
        self.calibration: Calibration | None = None

    @classmethod
    def from_names(
        cls,
        methods: Sequence[str],
        budgets: Sequence,
        *,
        scope: str | Scope = "image",
        params: Mapping[str, Mapping[str, object]] | None = None,
        newlines: str = "rows",
    ) -> Sieve:
        """A sieve from method names, one budget each, and ``{method: {parameter: value}}``: how the command line
        and the lmms-eval wrapper build theirs from text."""
        params = params or {}
        methods, budgets = list(methods), list(budgets)
        if len(methods) == 1:
            budget = budgets[0] if len(budgets) == 1 else budgets  # several: refused with the count message
            return cls(methods[0], budget, scope=scope, newlines=newlines, **dict(params.get(methods[0], {})))
        instances = [plan.make_method(m, params.get(m, {})) for m in methods]
        return cls(instances, list(budgets), scope=scope, newlines=newlines)

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.methods)

    @property
    def stages(self) -> plan.Stages:
        return plan.Stages(self.pre_method, self.pre_budget, self.llm_method, self.llm_budget)

    def check(self, model) -> None:
        """Refuse, without attaching anything, a setting that cannot run on ``model`` (unsupported stage, layer
        beyond its depth, budget above its token count, ...): what :meth:`apply` checks first, for callers that want
        the error before their first call (the lmms-eval wrapper checks right after loading the model)."""
        plan.check(self.stages, get_adapter(model).target(), self.newlines)

    def calibrate(self, model, batches) -> Calibration:
        """Fit an adaptive budget's per-image rule on ``batches`` (processor outputs) so its mean holds there.

        Runs the model's vision side only (encoder, signals, the criterion), never the LM, and does not attach
        anything to ``model``. Afterwards every image's count depends on that image alone; the fitted threshold is
        in ``self.budget`` (``Adaptive(..., threshold=...)``, reusable) and the fit in ``self.calibration``.
        """
        in_llm = self.llm_budget is not None and self.llm_budget.is_adaptive
        budget = self.llm_budget if in_llm else self.pre_budget
        if not budget.is_adaptive:
            raise BudgetError(f"calibrate() fits adaptive budgets; this sieve's budget is {self.pre_budget}")
        adapter = get_adapter(model)
        plan.check(self.stages, adapter.target(), self.newlines, calibrating=True)
        with recording() as records, torch.no_grad():
            for batch in batches:
                if not adapter.is_visual(batch):
                    continue
                kwargs, report = adapter.prepare(dict(batch), self.pre_method, self.pre_budget, self.name)
                if in_llm:  # the in-LLM targets are read off the tokens entering the LM
                    llm_counts(budget, report.images, lm_input_features(kwargs))
        calibration = fit(records)
        fitted = Budget(budget.value.calibrated(calibration.threshold), budget.scope)
        if self.budget is budget:
            self.budget = fitted
        if in_llm:
            self.llm_budget = fitted
        else:
            self.pre_budget = fitted
        self.calibration = calibration
        return calibration

    def apply(self, model) -> SieveHandle:
        """Attach to ``model`` until ``handle.remove()``; prefer ``with sieve(model):``."""
        return SieveHandle(self, model)

    @contextmanager
    def __call__(self, model) -> Iterator[SieveHandle]:
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


def _bind(fn, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Merge positional arguments into keyword arguments by the callee's parameter names."""
    if not args:
        return dict(kwargs)
    names = [
        n for n, p in inspect.signature(fn).parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
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
        plan.check(sieve.stages, adapter.target(), sieve.newlines)
        if sieve.newlines != "rows":
            adapter.newlines = sieve.newlines
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
        self._generating = 0  # > 0 while this handle's generate() runs: its forwards are not new calls
        model.generate = generate
        _SIEVED.add(model)
        self.active = True

    @property
    def last_report(self) -> SieveReport | None:
        return self.sieve.last_report

    def _prepare(self, kwargs: dict[str, Any], left_pad: bool = False):
        sieve = self.sieve
        if sieve.llm_method is not None and kwargs.get("labels") is not None and kwargs.get("pixel_values") is not None:
            raise StageError(
                "labels cannot be used with an in-LLM stage: the LM's output no longer covers every input position"
            )
        new_kwargs, report = self.adapter.prepare(kwargs, sieve.pre_method, sieve.pre_budget, sieve.name, left_pad)
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
            if sieve.llm_budget.is_adaptive:
                flat = llm_counts(sieve.llm_budget, report.images, lm_input_features(kwargs))
            else:
                flat = self.adapter.llm_targets(sieve.llm_budget, report.images)
            for im, k in zip(report.images, flat):
                targets[im.sample].append(k)
        for im in report.images:
            counts[im.sample].append(im.tokens_out)
        stage = LLMStage(
            self.adapter,
            sieve.llm_method,
            targets,
            report.visual_index,
            mask,
            counts,
            report.host_visual_index,
            report.host_attention_mask,
        )
        report.llm_budget = str(sieve.llm_budget) if sieve.llm_budget is not None else f"{sieve.llm_method.name} rule"
        if isinstance(sieve.pre_method, KeepAll):
            report.stage, report.budget = IN_LLM, report.llm_budget
        else:
            report.stage = f"{sieve.pre_method.stage}+{IN_LLM}"
        return stage

    def _pre_forward(self, module, args, kwargs):
        if self._generating:
            if not args and not self.adapter.is_visual(kwargs):
                return None  # the common decoding-step case, without binding the signature each token
        merged = _bind(type(module).forward.__get__(module), args, kwargs)
        if not self.adapter.is_visual(merged):
            if not self._generating and not _continues_cache(merged.get("past_key_values")):
                self._note_text_only(merged)  # a new text-only call: the report must not keep the last image's
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
            self._note_text_only(merged)
            return self._run_generate(merged)
        original_ids = merged["input_ids"]
        # generate() itself runs without autograd; encoding and selection happen before it, so they must too.
        # The shrunk prompt is re-padded on the left whatever the caller's side: generation continues each row
        # after its last slot, and the caller's own prompt is put back in front of the new tokens afterwards.
        with torch.no_grad():
            new_kwargs, report, stage = self._prepare(merged, left_pad=True)
        if stage is None:
            out = self._run_generate(new_kwargs)
        else:
            stage.install()
            try:
                out = self._run_generate(new_kwargs)
            finally:
                stage.remove()
            stage.fill(report)
        return _restore_prompt(out, original_ids, report.seq_len_out)

    def _run_generate(self, kwargs: dict[str, Any]):
        self._generating += 1
        try:
            return self._generate(**kwargs)
        finally:
            self._generating -= 1

    def _note_text_only(self, kwargs: dict[str, Any]) -> None:
        sieve = self.sieve
        self.sieve.last_report = self.adapter.text_report(kwargs, sieve.pre_method, sieve.pre_budget, sieve.name)

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

    def __enter__(self) -> SieveHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _continues_cache(cache) -> bool:
    """Whether a forward call continues from a filled KV cache (a decoding step of the caller's own loop)."""
    if cache is None:
        return False
    try:
        return int(cache.get_seq_length()) > 0
    except (AttributeError, TypeError):
        return bool(cache)


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
