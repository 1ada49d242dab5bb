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
from .budget import Budget, Scope
from .errors import TokensieveError
from .methods import get_method, method_names
from .methods.base import Method
from .report import SieveReport

_SIEVED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


class Sieve:
    """A method with its budget, ready to be applied to models.

    >>> sieve = Sieve("evocut", budget=64)          # 64 visual tokens per image
    >>> with sieve(model):
    ...     out = model.generate(**inputs, max_new_tokens=32)
    >>> sieve.last_report.summary()
    """

    def __init__(self, method: str | Method, budget: int | float | Budget, *, scope: str | Scope = "image", **params):
        if isinstance(method, Method):
            if params:
                raise TypeError("pass hyper-parameters to the Method instance, not to Sieve, when giving an instance")
            self.method = method
        else:
            cls = get_method(method)
            try:
                self.method = cls(**params)
            except TypeError as exc:
                accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
                raise TypeError(f"bad parameter for method {cls.name!r}: {exc}; it accepts {accepted}") from None
        self.budget = Budget.parse(budget, scope)
        self.last_report: SieveReport | None = None

    @property
    def name(self) -> str:
        return self.method.name

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
        return f"Sieve({self.method!r}, budget={self.budget.value!r}, scope={self.budget.scope.value!r})"


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
        adapter.check_budget(sieve.budget)
        if model in _SIEVED:
            raise TokensieveError(
                f"this {type(model).__name__} already has a sieve applied; remove it first (one sieve per model)"
            )
        self.sieve = sieve
        self.adapter = adapter
        self._model = weakref.ref(model)
        self._generate = model.generate  # the class's bound method
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
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
        new_kwargs, report = self.adapter.prepare(kwargs, self.sieve.method, self.sieve.budget, self.sieve.name)
        if report is not None:
            self.sieve.last_report = report
        return new_kwargs, report

    def _pre_forward(self, module, args, kwargs):
        if not args and not self.adapter.is_visual(kwargs):
            return None  # the common decoding-step case, without binding the signature each token
        merged = _bind(type(module).forward.__get__(module), args, kwargs)
        if not self.adapter.is_visual(merged):
            return None  # text-only call, or a decoding step of a sieved generate()
        new_kwargs, _ = self._prepare(merged)
        return (), new_kwargs

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
        new_kwargs, report = self._prepare(merged)
        out = self._generate(**new_kwargs)
        return _restore_prompt(out, original_ids, report.seq_len_out)

    def remove(self) -> None:
        """Detach; safe to call twice."""
        if not self.active:
            return
        self._hook.remove()
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
