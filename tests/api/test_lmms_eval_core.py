"""The lmms-eval integration seen from the core install: optional, shipped as package data, clear when missing."""

import importlib.util
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from tokensieve.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_the_integration_package_imports_without_lmms_eval():
    from tokensieve.lmms_eval import TASKS_DIR

    names = sorted(p.name for p in TASKS_DIR.iterdir() if p.suffix in (".yaml", ".py", ".jsonl"))
    assert {"tokensieve_easyvqa.yaml", "tokensieve_shapes.yaml", "utils.py"} <= set(names)


def test_every_task_file_is_package_data():
    """The task folder has no __init__.py, so only package-data globs put its files into a wheel."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tokensieve"]
    tasks = ROOT / "src" / "tokensieve" / "lmms_eval" / "tasks"
    for f in tasks.iterdir():
        if f.is_file() and f.suffix in (".yaml", ".py", ".jsonl"):
            rel = f.relative_to(ROOT / "src" / "tokensieve").as_posix()
            assert any(fnmatch(rel, g) for g in globs), f"{rel} is not covered by package-data {globs}"


def test_entry_point_names_the_wrapper_class():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["entry-points"]["lmms_eval.models"]["tokensieve"] == "tokensieve.lmms_eval.manifest:MANIFEST"
    assert "filelock<4" in meta["optional-dependencies"]["lmms-eval"]
    source = (ROOT / "src" / "tokensieve" / "lmms_eval" / "manifest.py").read_text()
    assert '"tokensieve.lmms_eval.model.TokensieveChat"' in source
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["from lmms_eval.models.registry_v2 import ModelManifest"]  # import-light payload


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is not None, reason="lmms-eval is installed here")
def test_launcher_without_lmms_eval_says_how_to_install(capsys):
    assert main(["lmms-eval", "--tasks", "tokensieve_easyvqa"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps lmms-eval==0.7.3" in err and "tokensieve[lmms-eval]" in err
