"""Shared by the benchmark scripts: machine facts and writing a result as JSON plus a Markdown table."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def machine(threads: int, repeats: int, **extra) -> dict:
    return dict(
        cpu=platform.processor() or platform.machine(),
        threads=threads,
        torch=torch.__version__,
        repeats=repeats,
        **extra,
    )


def write(out_dir: str, name: str, meta: dict, rows: list[dict], table: list[str]) -> None:
    """``<name>.json`` holds every number; ``<name>.md`` the table the README quotes. Also prints the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
