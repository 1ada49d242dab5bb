"""The house's walls: a small package root, files of one job, imports that only run down, and old paths that work.

The layer order below is the architecture (``ARCHITECTURE.md`` draws it): a room may import rooms at its own level
or below, never above, at module level or inside a function. A new module joins a room by its folder; a new root
module must be placed in ``LAYERS`` by whoever adds it.
"""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "tokensieve"

LAYERS = [
    {"errors", "_version"},
    {"budget", "report", "data"},
    {"methods"},
    {"adaptive", "engine"},
    {"plan"},
    {"adapters"},
    {"session"},
    {"models"},
    {"tools"},
    {"trainer", "lmms_eval"},
    {"cli"},
    {"__main__", "_compat", "__init__"},
]
"""Rooms of ``src/tokensieve`` from the bottom up: a folder or a root module each (``__init__``: the package front)."""

LEVEL = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every ``tokensieve`` module a file imports (anywhere in it), with the line."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("tokensieve"):
                continue
            if target == "tokensieve":  # from tokensieve import x / from .. import x: the rooms named
                out += [(f"tokensieve.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("tokensieve")]
    return out


def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_root_holds_at_most_ten_modules():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 10, root


def test_every_room_has_a_place_in_the_layers():
    rooms = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()
    }
    assert rooms <= set(LEVEL), f"place {sorted(rooms - set(LEVEL))} in LAYERS"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up_the_house(path):
    here = _room(_module_of(path))
    for target, line in _imports(path):
        there = _room(target)
        assert LEVEL[there] <= LEVEL[here], (
            f"{path.relative_to(ROOT)}:{line} imports {target} ({there}, layer {LEVEL[there]}) from {here} "
            f"(layer {LEVEL[here]})"
        )


def test_no_source_file_is_over_600_lines():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "integrations").rglob("*.py")]
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > 600}
    assert not long, long


OLD_PATHS = {
    "tokensieve.evaluate": ["load_model", "predict", "prompt_text"],
    "tokensieve.tiny": ["build_tiny_llava", "demo_image"],
    "tokensieve.flops": ["count_flops", "trace_from_report", "vanilla_trace"],
    "tokensieve.capture": ["capture_encoder", "grid_signals"],
    "tokensieve.encoder_stage": ["run_encoder_stage"],
    "tokensieve.llm_stage": ["LLMStage", "KeepAll"],
    "tokensieve.anyres": ["select_image", "num_tokens"],
    "tokensieve.merge_units": ["select_units", "UnitSignals"],
    "tokensieve.placeholders": ["find_image_spans"],
    "tokensieve.loading": ["load_model", "load_default_model", "EMBEDDED_MODELS"],
    "tokensieve.archs": ["build_arch", "synthetic_inputs"],
    "tokensieve.bench": ["run_bench"],
    "tokensieve.measure": ["measure_call"],
    "tokensieve.show": ["panels_for"],
    "tokensieve.configs": ["parse_configs", "Config"],
    "tokensieve.inputs": ["load_image"],
    "tokensieve.train": ["TrainConfig", "train", "save", "prompt_text"],
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_module_paths_still_import_with_a_pointer_to_the_new_one(old):
    from tokensieve._compat import MOVED

    new = importlib.import_module(MOVED[old])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is new
    for name in OLD_PATHS[old]:
        assert hasattr(module, name), f"{old}.{name}"
    if caught:  # the first import of the alias warns; a later one finds it in sys.modules
        assert MOVED[old] in str(caught[0].message) and caught[0].category is DeprecationWarning


def test_old_names_of_the_public_api_still_work():
    import tokensieve
    from tokensieve.data import shapes
    from tokensieve.methods import get_method
    from tokensieve.methods.base import (  # the in-encoder and in-LLM contracts moved to encoder.py / llm.py
        EncoderCut,
        EncoderMethod,
        LLMMethod,
        Method,
        Selection,
        Signals,
        keep_with_cls,
        topk_sorted,
    )
    from tokensieve.methods.encoder import EncoderMethod as NewEncoderMethod
    from tokensieve.methods.llm import LLMMethod as NewLLMMethod

    assert tokensieve.Sieve.__name__ == "Sieve" and get_method("evocut").name == "evocut"
    assert EncoderMethod is NewEncoderMethod and LLMMethod is NewLLMMethod
    assert issubclass(EncoderMethod, Method) and EncoderCut and Selection and Signals
    assert keep_with_cls and topk_sorted and shapes.sample("test", 0).question
