"""What every command shares on the terminal: where results and notes go, and how a model is loaded for a user.

Kept free of torch and rich at import time: ``tokensieve --help`` and argument errors pass through here.
"""

from __future__ import annotations

import sys


def _console(stream):
    """Rich console on ``stream``; files and pipes get wide lines (no wrapping at 80 columns) and no colour."""
    from rich.console import Console

    if stream.isatty():
        return Console(file=stream)
    return Console(file=stream, width=1000, soft_wrap=True)


class Out:
    """stdout for results, stderr for notes and warnings (so ``--json`` and pipes stay clean)."""

    def __init__(self, quiet: bool = False):
        self.console = _console(sys.stdout)
        self.err = _console(sys.stderr)
        self.quiet = quiet

    def note(self, text: str, style: str = "cyan") -> None:
        from rich.markup import escape

        if not self.quiet:
            self.err.print(f"[{style}]{escape(text)}[/]", highlight=False)

    def warn(self, text: str) -> None:
        from rich.markup import escape

        self.err.print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False)


def model_note(spec, out: Out) -> None:
    """Say which embedded model answers, and what it can and cannot do."""
    from ..models.loading import DEFAULT_MODEL, EMBEDDED_MODELS

    entry = EMBEDDED_MODELS.get(str(spec or DEFAULT_MODEL))
    if entry is not None:
        out.note(entry.note, "bold yellow" if entry.path is None else "cyan")


def quiet_loading() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load of a 4 MB model is noise on a command line


def load_with_note(spec, out: Out, **kwargs):
    """:func:`tokensieve.models.loading.load_model`, after the note on an embedded model and without progress bars."""
    from ..models.loading import load_model

    model_note(spec, out)
    quiet_loading()
    return load_model(spec, **kwargs)
