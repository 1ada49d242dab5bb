"""tokensieve inside lmms-eval: a batched chat model wrapper, two offline tasks and a launcher.

lmms-eval is optional: nothing here is imported by the core package. The pieces:

* ``manifest.py``: the ``lmms_eval.models`` entry-point payload (``--model tokensieve``); import-light on purpose,
  because lmms-eval stops reading entry points at the first one that fails to import.
* ``model.py``: ``TokensieveChat``, one generic chat wrapper for every family tokensieve supports.
* ``tasks/``: ``tokensieve_easyvqa`` and ``tokensieve_shapes`` (test splits, no download), for ``--include_path``.
* ``launch.py`` (``tokensieve lmms-eval ...`` / ``python -m tokensieve.lmms_eval ...``): adds the task folder,
  sets offline mode and turns an error that lmms-eval only logs into a non-zero exit.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
