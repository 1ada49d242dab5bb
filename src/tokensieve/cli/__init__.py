"""tokensieve: training-free visual-token pruning for Hugging Face VLMs, from the command line.

Methods and budgets use one grammar on every command: '+' chains the stages of one configuration
(--method evocut+fastv --budget 192+128, one budget per method), ',' separates configurations to compare
(--methods evocut,divprune --budgets 64,32). A budget is an int (visual tokens kept per image) or a float in
(0, 1] (keep ratio). Without --model, commands use the embedded default model (small, trained, offline).

This module is the parser and the dispatch; each command's body is a module of this package (``run``, ``eval``,
``bench``, ``show``, ``catalog``) that checks its arguments before it imports torch or the tools it drives.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..models.loading import MODEL_HELP
from ..tools.configs import parse_param
from .console import Out
from .defaults import EVAL_BUDGETS, EVAL_METHODS, GENERIC_QUESTION

EXIT_INTERRUPTED = 130


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none or the text already says what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors that point to ``--help``, and defaults shown in every help text."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def _param(text: str):
    try:
        return parse_param(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--param ")) from None


def _add_model(p, what: str = "") -> None:
    p.add_argument("--model", help=MODEL_HELP + what + "; default: the embedded default model")


def _add_configs(p, *, several: bool, methods: str | None, budgets: str | None) -> None:
    """--method/--methods, --budget/--budgets, --param and --scope, the same on every command."""
    if several:
        p.add_argument(
            "--methods",
            "--method",
            dest="methods",
            default=methods,
            metavar="M[,M...]",
            help="methods to compare, separated by ','; chain stages with '+' (evocut+fastv)",
        )
        p.add_argument(
            "--budgets",
            "--budget",
            dest="budgets",
            default=budgets,
            metavar="B[,B...]",
            help="budgets, each method is run at each: int = visual tokens kept per image, float in (0, 1] "
            "= keep ratio; a chained method takes one per stage (192+128)",
        )
    else:
        p.add_argument(
            "--method",
            "--methods",
            dest="methods",
            default=methods,
            metavar="M",
            help="method, or a chain of one pre-LLM and one in-LLM method joined by '+' (evocut+fastv)",
        )
        p.add_argument(
            "--budget",
            "--budgets",
            dest="budgets",
            default=budgets,
            metavar="B",
            help="int = visual tokens kept per image, float in (0, 1] = keep ratio; a chain takes one per "
            "stage (--budget 192+128: 192 enter the LM, 128 on average over its layers)",
        )
    p.add_argument(
        "--param",
        type=_param,
        action="append",
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="a method hyper-parameter, repeatable (e.g. --param fastv.layer=1; `tokensieve methods NAME` "
        "lists them); plain NAME=VALUE when the command runs one method",
    )
    p.add_argument(
        "--scope",
        default="image",
        choices=("image", "crop", "frame", "global"),
        help="what an int budget counts per: each image, each anyres crop, each video frame, or the whole prompt",
    )


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = Parser(prog="tokensieve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tokensieve {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    methods = sub.add_parser(
        "methods",
        help="list the methods, or explain one (its parameters and defaults)",
        description="List every method, or with NAME its stage, signals and parameters.",
    )
    methods.add_argument("name", nargs="?", help="a method name, e.g. fastv")

    run = sub.add_parser(
        "run",
        help="answer one question about one image under a method",
        description="Answer one question about one image with a method applied and report the "
        "visual tokens kept. The question goes through the model's chat template, "
        "which inserts the image placeholder.",
    )
    _add_model(run)
    run.add_argument(
        "--tiny",
        action="store_true",
        help="use the tiny random-weight LLaVA (fast, meaningless answers); same as --model tiny",
    )
    _add_configs(run, several=False, methods="evocut", budgets="64")
    run.add_argument("--image", help="image file (PNG, JPEG, ...); default: a generated benchmark scene")
    run.add_argument(
        "--prompt",
        help="the question only: the image placeholder and chat template are added for you "
        "(the default model reads 'user : <image> QUESTION assistant : '); a prompt that "
        "already holds the image token is sent as written. Default: the scene's own "
        "question, or a generic one for your --image",
    )
    run.add_argument("--max-new-tokens", type=_count(1), default=16, help="tokens to generate")
    run.add_argument("--compare", action="store_true", help="also answer without compression, and time both")
    run.add_argument(
        "--repeats",
        type=_count(1),
        default=3,
        help="with --compare: timed calls of each, alternating, after one warm-up call each",
    )
    run.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    ev = sub.add_parser(
        "eval",
        help="accuracy of the full-token model and of each method x budget on a test set",
        description="Accuracy retention on a benchmark: the full-token model, then every method at "
        "every budget, on the same questions. Results are saved after every finished "
        "configuration; rerunning the same command resumes. --from re-plots or merges "
        "saved results without running a model. An adaptive budget (adaptive:MEAN, "
        "adaptive:MEAN:MIN:MAX: a per-image count of that mean) is first calibrated on "
        "--calibration images of a split disjoint from the test set; "
        "adaptive:MEAN@THRESHOLD runs as given. Its kept tokens are the measured mean.",
    )
    _add_model(ev)
    ev.add_argument("--data", choices=("shapes", "easyvqa"), default="shapes", help="benchmark (test split)")
    _add_configs(ev, several=True, methods=None, budgets=None)
    ev.add_argument(
        "--limit",
        type=_count(1),
        help="evaluate N questions: shapes takes its first N (the six families "
        "in turn), easy-VQA N evenly spaced over its test split; default: "
        "all (shapes 2,004, easy-VQA 9,673)",
    )
    ev.add_argument("--batch-size", type=_count(1), default=32, help="questions per generate() call")
    ev.add_argument(
        "--calibration",
        type=_count(1),
        default=256,
        metavar="N",
        help="images that fit each adaptive budget given without @THRESHOLD (its mean holds on them), "
        "from the data set's calibration split, never the test split: shapes the first N of val, "
        "easy-VQA N evenly spaced questions of train",
    )
    ev.add_argument(
        "--out",
        required=True,
        help="folder for results.json (metadata, records, per-question answers), results.md and results.png",
    )
    ev.add_argument("--fresh", action="store_true", help="recompute everything instead of resuming from --out")
    ev.add_argument(
        "--from",
        dest="sources",
        action="append",
        default=[],
        metavar="RESULTS",
        help="re-plot or merge saved results (a results.json or its folder; repeatable) into --out, "
        f"running no model; default methods and budgets otherwise: {EVAL_METHODS} at {EVAL_BUDGETS}",
    )

    tiny = sub.add_parser("make-tiny", help="save the tiny random-weight demo LLaVA (model + processor) to DIR")
    tiny.add_argument("dir", help="folder to write (created)")
    add_measure_commands(sub)
    # handled in main() before parsing: every argument after it belongs to lmms-eval (tokensieve.lmms_eval.launch)
    sub.add_parser(
        "lmms-eval",
        add_help=False,
        help="run lmms-eval offline with --model tokensieve and the packaged "
        "tasks (pip install tokensieve[lmms-eval]; `tokensieve lmms-eval --help`)",
    )
    return parser


def add_measure_commands(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="time vanilla and methods interleaved; table, bench.json and a plot",
        description="Time to first token, stage split, decode, memory and FLOPs of vanilla and "
        "every method x budget, interleaved in one process.",
    )
    src = bench.add_mutually_exclusive_group()
    src.add_argument("--model", help=MODEL_HELP + " (AutoModelForImageTextToText + processor)")
    src.add_argument(
        "--arch",
        help="random-weight real-size architecture (llava15-cpu, llava15-7b, tiny; see "
        "tokensieve.models.archs); default llava15-cpu when --model is not given",
    )
    _add_configs(bench, several=True, methods="evocut,divprune", budgets="64")
    bench.add_argument("--repeats", type=_count(1), default=5, help="recorded rounds")
    bench.add_argument("--warmup", type=_count(0), default=1, help="unrecorded rounds before the repeats")
    bench.add_argument("--new-tokens", type=_count(1), default=8, help="tokens generated per call (decode timing)")
    bench.add_argument("--text-tokens", type=_count(1), default=40, help="text tokens around the image (--arch)")
    bench.add_argument("--image", help="image for --model; default: a generated scene")
    bench.add_argument(
        "--prompt", default=GENERIC_QUESTION, help="question for --model (the image placeholder is added for you)"
    )
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    bench.add_argument("--device", help="cpu or cuda; default cuda when available")
    bench.add_argument("--threads", type=_count(1), help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--flops-only", action="store_true", help="write the FLOPs table from the config, run nothing")
    bench.add_argument("--force", action="store_true", help="measure even when the run would take very long")
    bench.add_argument("--out", default="bench-results", help="output folder (bench.md, bench.json, bench.png)")

    show = sub.add_parser(
        "show",
        help="draw kept tokens (and merge groups) on an image, methods side by side",
        description="Draw which patches each configuration keeps (bright), merges (tinted, one "
        "colour per merged token) and drops (dim), one panel per method x budget.",
    )
    _add_configs(show, several=True, methods="evocut,divprune,visionzip,pool", budgets="36")
    show.add_argument("--image", help="image file; default: a generated scene")
    show.add_argument("--out", default="show.png", help="image file to write (.png, .jpg, .pdf, .svg)")
    src = show.add_mutually_exclusive_group()
    _add_model(src)
    src.add_argument("--arch", help="random-weight architecture instead (e.g. llava15-cpu: a 24x24 grid)")


COMMANDS = {
    "methods": "catalog:cmd_methods",
    "run": "run:cmd_run",
    "eval": "eval:cmd_eval",
    "make-tiny": "catalog:cmd_make_tiny",
    "bench": "bench:cmd_bench",
    "show": "show:cmd_show",
}
"""Each command's body, as ``module:function`` in this package. Imported only when the command runs, and each body
checks its arguments before it imports torch or the tools it drives: ``--help`` and a typo never wait for them."""


def _command(name: str):
    module, _, function = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(f".{module}", __package__), function)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends in one line on stderr naming the problem and the fix, exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lmms-eval"]:  # every argument after it belongs to lmms-eval
        from ..lmms_eval.launch import main as lmms_eval_main

        return lmms_eval_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, and argparse's own (one-line) errors
        return int(exc.code or 0)
    out = Out(quiet=getattr(args, "json", False))
    prog = f"tokensieve {args.command}"
    from ..errors import TokensieveError

    try:
        return _command(args.command)(args, out)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (TokensieveError, TypeError, ValueError, KeyError, OSError) as exc:
        if args.debug or os.environ.get("TOKENSIEVE_DEBUG"):
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input: say so, keep it one line, offer the traceback
        if args.debug or os.environ.get("TOKENSIEVE_DEBUG"):
            raise
        print(
            f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the "
            "traceback and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
