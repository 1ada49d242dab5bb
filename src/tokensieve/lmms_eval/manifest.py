"""Entry-point payload for lmms-eval's ``lmms_eval.models`` group (declared in pyproject.toml).

Kept import-light: lmms-eval loads every entry point of the group in one loop inside a ``try``, so a payload that
fails to import (or is slow) would hide every plugin after it. Only lmms-eval's registry dataclass is imported;
the wrapper itself is imported by class path when ``--model tokensieve`` is resolved.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="tokensieve", chat_class_path="tokensieve.lmms_eval.model.TokensieveChat")
