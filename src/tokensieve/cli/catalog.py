"""What ships with tokensieve, shown or saved without evaluating anything: ``tokensieve methods`` (every method, or
one with its parameters) and ``tokensieve make-tiny`` (the tiny random-weight model that ``run --tiny`` answers with).

``methods`` answers without loading a model: it imports the method classes (torch code) but never transformers.
"""

from __future__ import annotations

import sys

from .console import Out


def cmd_methods(args, out: Out) -> int:
    from rich.markup import escape
    from rich.table import Table

    from ..methods import get_method, method_names  # the method classes need torch, not transformers

    if args.name is None:
        table = Table(title="tokensieve methods (tokensieve methods NAME explains one)")
        for col in ("name", "stage", "signals", "description"):
            table.add_column(col)
        for m in map(get_method, method_names()):
            table.add_row(m.name, m.stage, escape(", ".join(m.signals) or "-"), escape(m.description))
        out.console.print(table)
        return 0
    from ..tools.configs import method_parameters

    cls = get_method(args.name)
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
    out.console.print(f"[bold]{cls.name}[/]: {escape(cls.description)}", highlight=False)
    out.console.print(escape(f"stage: {cls.stage}; signals: {', '.join(cls.signals) or 'none'}"), highlight=False)
    budget = (
        "layer-averaged visual tokens per image in the LM"
        if cls.stage == "in_llm"
        else "visual tokens per image entering the LM"
    )
    out.console.print(f"budget: {budget}", highlight=False)
    out.console.print(escape(" ".join(doc.split())), highlight=False)
    params = method_parameters(cls.name)
    if not params:
        out.console.print("parameters: none")
        return 0
    table = Table(title=f"parameters (--param {cls.name}.NAME=VALUE; Python: Sieve({cls.name!r}, budget, NAME=VALUE))")
    for col in ("name", "default", "meaning"):
        table.add_column(col)
    for pname, default in params.items():
        table.add_row(pname, escape(repr(default)), escape(cls.param_help.get(pname, "")))
    out.console.print(table)
    return 0


def cmd_make_tiny(args, out: Out) -> int:
    from ..models.tiny import build_tiny_llava
    from ..tools.inputs import prepare_out_dir

    prepare_out_dir(args.dir, "make-tiny DIR")
    model, processor = build_tiny_llava()
    model.save_pretrained(args.dir)
    processor.save_pretrained(args.dir)
    out.console.print(f"saved tiny random-weight LLaVA to {args.dir}")
    return 0
