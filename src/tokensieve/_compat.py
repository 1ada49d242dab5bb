"""Old import paths, kept working for at least one release after the layout moved modules into folders.

``import tokensieve.flops`` (and every other module that lived in the package root before 0.2) gives the module at
its new home, the same object, with a ``DeprecationWarning`` that names the new path. A meta-path finder does this
on first import, so the package root stays small and nothing heavy is imported ahead of use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    **{
        f"tokensieve.{m}": f"tokensieve.engine.{m}"
        for m in ("capture", "encoder_stage", "llm_stage", "placeholders", "anyres", "merge_units")
    },
    **{f"tokensieve.{m}": f"tokensieve.models.{m}" for m in ("loading", "tiny", "archs")},
    **{
        f"tokensieve.{m}": f"tokensieve.tools.{m}"
        for m in ("evaluate", "bench", "measure", "flops", "show", "configs", "inputs")
    },
    "tokensieve.train": "tokensieve.trainer",
}
"""Old module path -> new module path."""


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs: dict[str, object] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path will be removed in a later release",
            DeprecationWarning,
            stacklevel=2,
        )  # warnings skips the import system's frames
        module = importlib.import_module(new)
        self._specs[new] = module.__spec__
        return module

    def exec_module(self, module):
        # the import system stamped the alias's spec on the shared module object; give it its own back
        module.__spec__ = self._specs[module.__name__]


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
