"""tokensieve: training-free visual-token pruning for Hugging Face VLMs, from the command line.

Methods and budgets use one grammar on every command: '+' chains the stages of one configuration
(--method evocut+fastv --budget 192+128, one budget per method), ',' separates configurations to compare
(--methods evocut,divprune --budgets 64,32). A budget is an int (visual tokens kept per image) or a float in
(0, 1] (keep ratio). Without --model, commands use the embedded default model (small, trained, offline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .models.loading import MODEL_HELP
from .tools.configs import parse_param

DEMO_SAMPLE = 4  # a shapes test scene with a tiny object; its own question is the default prompt
GENERIC_QUESTION = "What is in the picture?"
DEFAULT_IMAGE_QUESTION = "how many shapes are there ?"  # the default model counts shapes reliably
EVAL_METHODS = "evocut,random,pool"
EVAL_BUDGETS = "0.5,0.25,0.125,0.0625"
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
    from . import __version__

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


# -- output -------------------------------------------------------------------------------------------------------


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


def _model_note(spec, out: Out) -> None:
    """Say which embedded model answers, and what it can and cannot do."""
    from .models.loading import DEFAULT_MODEL, EMBEDDED_MODELS

    entry = EMBEDDED_MODELS.get(str(spec or DEFAULT_MODEL))
    if entry is not None:
        out.note(entry.note, "bold yellow" if entry.path is None else "cyan")


def _quiet_loading() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load of a 4 MB model is noise on a command line


def _load_model(spec, out: Out, **kwargs):
    from .models.loading import load_model

    _model_note(spec, out)
    _quiet_loading()
    return load_model(spec, **kwargs)


# -- run ----------------------------------------------------------------------------------------------------------


def cmd_run(args, out: Out) -> int:
    from .tools.configs import format_budget, group_params, parse_configs
    from .tools.inputs import check_question, load_image

    if args.tiny:
        if args.model:
            raise ValueError("give either --model or --tiny, not both")
        args.model = "tiny"
    configs = parse_configs(args.methods, args.budgets, method_option="--method", budget_option="--budget", single=True)
    params = group_params(args.param, configs)
    sieve = configs[0].sieve(params, args.scope)  # every check that needs no model, before loading one
    question = check_question(args.prompt)
    image = load_image(args.image) if args.image else None
    model, processor = _load_model(args.model, out)

    import torch

    from .data import shapes
    from .models.loading import DEFAULT_MODEL, EMBEDDED_MODELS
    from .tools.inputs import build_prompt

    name = args.model or DEFAULT_MODEL
    entry = EMBEDDED_MODELS.get(name)
    trained = entry is not None and entry.benchmark  # knows the benchmark's words and questions
    demo = shapes.sample("test", DEMO_SAMPLE)
    if image is None:
        image = demo.image
    if question is None:
        if trained:
            question = demo.question if args.image is None else DEFAULT_IMAGE_QUESTION
        else:
            question = GENERIC_QUESTION
    text, notes = build_prompt(processor, question)
    for note in notes:
        out.warn(note)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    def call(with_sieve: bool):
        t0 = time.perf_counter()
        if with_sieve:
            with sieve(model):
                ids = model.generate(**inputs, **gen_kwargs)
        else:
            ids = model.generate(**inputs, **gen_kwargs)
        elapsed = time.perf_counter() - t0
        return processor.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)[0].strip(), elapsed

    times = {True: [], False: []}
    answers = {}
    with torch.inference_mode():
        if args.compare:
            # one unrecorded call each, then alternate which goes first, so neither gets the cold start or the drift
            call(False)
            call(True)
            for r in range(args.repeats):
                for with_sieve in (False, True) if r % 2 == 0 else (True, False):
                    answers[with_sieve], t = call(with_sieve)
                    times[with_sieve].append(t)
        else:
            answers[True], t = call(True)
            times[True].append(t)
    report = sieve.last_report
    result = {
        "model": "tiny-random-llava" if name == "tiny" else name,
        "method": sieve.name,
        "budget": configs[0].budget,
        "prompt": question,
    }
    if trained and args.image is None and args.prompt is None:
        result["expected"] = demo.answer
    result.update(
        answer=answers[True],
        generate_s=_median(times[True]),
        visual_tokens_in=report.tokens_in,
        visual_tokens_out=report.tokens_out,
        seq_len_in=report.seq_len_in,
        seq_len_out=report.seq_len_out,
        encode_s=report.encode_s,
        selection_s=report.selection_s,
        llm_visual_tokens_avg=report.llm_visual_tokens_avg[0] if report.llm_visual_tokens_avg else report.tokens_out,
        timing={
            "calls": len(times[True]),
            "warmup": 1 if args.compare else 0,
            "alternating": args.compare,
            "generate_s_runs": times[True],
        },
    )
    if args.compare:
        result["vanilla"] = {
            "answer": answers[False],
            "generate_s": _median(times[False]),
            "generate_s_runs": times[False],
        }
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_row("prompt", escape(repr(question)))
    table.add_row(
        "answer",
        escape(repr(result["answer"]) + (f" (expected {result['expected']!r})" if "expected" in result else "")),
    )
    budget = format_budget(configs[0].budgets)
    table.add_row("visual tokens", f"{report.tokens_in} -> {report.tokens_out} ({sieve.name}, budget {budget})")
    if report.llm_budget:
        table.add_row("in the LM", f"{result['llm_visual_tokens_avg']:.1f} visual tokens averaged over decoder layers")
    table.add_row("prompt length", f"{report.seq_len_in} -> {report.seq_len_out} tokens")
    table.add_row("encode + select", f"{report.encode_s * 1e3:.1f} ms (selection {report.selection_s * 1e3:.2f} ms)")
    if args.compare:
        table.add_row("vanilla answer", escape(repr(answers[False])))
        table.add_row(
            "generate",
            f"{_spread(times[True])} with {sieve.name}, {_spread(times[False])} vanilla: median "
            f"(min-max) of {args.repeats} alternating calls each after a warm-up, up to "
            f"{args.max_new_tokens} new tokens",
        )
    else:
        table.add_row(
            "generate",
            f"{times[True][0] * 1e3:.1f} ms for up to {args.max_new_tokens} new tokens: one cold "
            "call (first-call overhead included)",
        )
    table.add_row(
        "timing",
        "a rough look, not a benchmark: `tokensieve bench` measures time to first token, stages, "
        "memory and FLOPs over interleaved repeats",
    )
    out.console.print(table)
    return 0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0] * 1e3:.1f} ms"
    return f"{_median(values) * 1e3:.1f} ms ({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f})"


# -- methods ------------------------------------------------------------------------------------------------------


def cmd_methods(args, out: Out) -> int:
    from rich.markup import escape
    from rich.table import Table

    from .methods import get_method, method_names  # the method classes need torch, not transformers

    if args.name is None:
        table = Table(title="tokensieve methods (tokensieve methods NAME explains one)")
        for col in ("name", "stage", "signals", "description"):
            table.add_column(col)
        for m in map(get_method, method_names()):
            table.add_row(m.name, m.stage, escape(", ".join(m.signals) or "-"), escape(m.description))
        out.console.print(table)
        return 0
    from .tools.configs import method_parameters

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


# -- eval ---------------------------------------------------------------------------------------------------------


def cmd_eval(args, out: Out) -> int:
    from .tools.inputs import prepare_out_dir

    if args.sources:
        given = [
            o
            for o, v in (
                ("--methods", args.methods),
                ("--budgets", args.budgets),
                ("--param", args.param or None),
                ("--model", args.model),
                ("--limit", args.limit),
            )
            if v is not None
        ]
        if given:
            raise ValueError(
                f"--from re-plots saved results and runs no model, so {', '.join(given)} cannot apply; "
                "drop them, or drop --from to evaluate"
            )
        prepare_out_dir(args.out)
        from .tools.evaluate import merge_results

        result = merge_results(args.sources, args.out, log=out.note)
    else:
        from .tools.configs import group_params, parse_configs

        configs = parse_configs(
            EVAL_METHODS if args.methods is None else args.methods,
            EVAL_BUDGETS if args.budgets is None else args.budgets,
            calibrates=True,
        )
        params = group_params(args.param, configs)
        for config in configs:
            config.sieve(params, args.scope)  # chains, budgets and parameters, before anything runs
        prepare_out_dir(args.out)
        from .tools.evaluate import run_eval

        _model_note(args.model, out)
        _quiet_loading()
        result = run_eval(
            args.model,
            args.data,
            configs,
            args.out,
            limit=args.limit,
            batch_size=args.batch_size,
            params=params,
            scope=args.scope,
            fresh=args.fresh,
            console=out.err,
            log=out.note,
            calibration=args.calibration,
        )
    from .tools.evaluate import markdown_table

    table = markdown_table(result["records"], result["title"])
    if out.console.is_terminal:
        from rich.markdown import Markdown

        out.console.print(Markdown(table))
    else:
        print(table, end="")
    out.note(f"wrote results.json, results.md, results.png to {args.out}")
    return 0


def cmd_make_tiny(args, out: Out) -> int:
    from .models.tiny import build_tiny_llava
    from .tools.inputs import prepare_out_dir

    prepare_out_dir(args.dir, "make-tiny DIR")
    model, processor = build_tiny_llava()
    model.save_pretrained(args.dir)
    processor.save_pretrained(args.dir)
    out.console.print(f"saved tiny random-weight LLaVA to {args.dir}")
    return 0


# -- tokensieve bench / tokensieve show ------------------------------------------------------------------------

CPU_GFLOPS = 100.0
"""Rough fp32 throughput of a 2-core CPU (this project's machine measured 120-130), for refusing hour-long runs."""


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


def _available_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def cmd_bench(args, out: Out) -> int:
    from .tools.configs import group_params, parse_configs
    from .tools.inputs import check_question, load_image, prepare_out_dir

    configs = parse_configs(args.methods, args.budgets)
    params = group_params(args.param, configs)
    for config in configs:
        config.sieve(params, args.scope)
    check_question(args.prompt)
    image = load_image(args.image) if args.image else None
    prepare_out_dir(args.out)

    import torch

    from .models.archs import arch_config, arch_parameters, build_arch, synthetic_inputs
    from .tools.bench import check_budgets, flops_only, model_probe, run_bench, write_results
    from .tools.configs import VANILLA, Config
    from .tools.flops import count_flops, vanilla_trace

    configs = [Config((VANILLA,))] + configs
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model:
        from .models.loading import check_model_dir, model_path

        path = model_path(args.model)
        if path is None:
            raise ValueError(f"--model {args.model} is built in memory; bench it with --arch {args.model}")
        config = check_model_dir(path)
        name = args.model
    else:
        name = args.arch or "llava15-cpu"
        config = arch_config(name)
    check_budgets(config, configs)
    if args.model:
        probe = model_probe(path, config, image, args.prompt, args.text_tokens, log=out.note, warn=out.warn)
    else:
        probe = synthetic_inputs(config, text_tokens=args.text_tokens)
    title = f"tokensieve bench: {name}"
    need = arch_parameters(config) * torch.finfo(dtype).bits // 8
    avail = _available_bytes(device)
    reason = "--flops-only given" if args.flops_only else None
    if reason is None and need * 1.15 + (1 << 30) > avail:
        reason = (
            f"{name} needs about {need / 1e9:.1f} GB of weights in {args.dtype} and this {device} has "
            f"{avail / 1e9:.1f} GB available"
        )
    if reason is None and device == "cpu" and not args.force:
        flops = count_flops(config, vanilla_trace(config, **probe, new_tokens=args.new_tokens)).total
        est = flops / (CPU_GFLOPS * 1e9) * len(configs) * (args.repeats + args.warmup)
        if est > 1800:
            reason = (
                f"measuring would take roughly {est / 60:.0f} min on this CPU at ~{CPU_GFLOPS:.0f} GFLOP/s "
                "(pass --force to run anyway)"
            )
    if reason is not None:
        note = (
            f"FLOPs only, from the config (no weights, nothing run): {reason}. Exact for pre- and "
            "post-projector methods; timing needs enough memory or a GPU."
        )
        out.note(note, "bold yellow")
        result = flops_only(config, probe, configs, new_tokens=args.new_tokens)
        result["meta"].update(note=note, model=name)
        paths = write_results(result, args.out, title)
        print(paths["md"].read_text())
        out.note(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
    if args.model:
        model, _ = _load_model(args.model, out, dtype=dtype, device=device, with_processor=False)
        batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in probe.items()}
    else:
        out.note(f"building {name} (random weights, {args.dtype}, {device}) ...")
        model = build_arch(name, dtype=dtype, device=device)
        batch = synthetic_inputs(model, text_tokens=args.text_tokens)
    result = run_bench(
        model,
        batch,
        configs,
        repeats=args.repeats,
        warmup=args.warmup,
        new_tokens=args.new_tokens,
        log=out.note,
        params=params,
        scope=args.scope,
    )
    result["meta"].update(model=name, prompt_tokens=int(batch["input_ids"].shape[1]))
    paths = write_results(result, args.out, title)
    print(paths["md"].read_text())
    out.note(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_show(args, out: Out) -> int:
    from .tools.configs import group_params, parse_configs
    from .tools.inputs import check_out_file, load_image

    configs = parse_configs(args.methods, args.budgets)
    params = group_params(args.param, configs)
    for config in configs:
        config.sieve(params, args.scope)
    image = load_image(args.image) if args.image else None
    check_out_file(args.out)

    from .models.tiny import demo_image
    from .tools.show import image_batch, model_view, panels_for, render

    image = image or demo_image()
    if args.arch:
        from .models.archs import build_arch

        model, image_processor = build_arch(args.arch), None
        name = args.arch
    else:
        model, processor = _load_model(args.model, out)
        image_processor = getattr(processor, "image_processor", None)
        name = args.model or "default model"
    batch = image_batch(model, image, image_processor)
    panels = panels_for(model, batch, configs, params=params, scope=args.scope)
    path = render(
        model_view(image), panels, args.out, suptitle=f"{name}: bright = kept, tinted = merged, dim = dropped"
    )
    for p in panels:
        out.console.print(f"{p.title}: {len(p.kept)} kept patches, {len(p.merged_cells)} merge groups", highlight=False)
    out.note(f"wrote {path}")
    return 0


COMMANDS = {
    "methods": cmd_methods,
    "run": cmd_run,
    "eval": cmd_eval,
    "make-tiny": cmd_make_tiny,
    "bench": cmd_bench,
    "show": cmd_show,
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends in one line on stderr naming the problem and the fix, exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lmms-eval"]:  # every argument after it belongs to lmms-eval
        from .lmms_eval.launch import main as lmms_eval_main

        return lmms_eval_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, and argparse's own (one-line) errors
        return int(exc.code or 0)
    out = Out(quiet=getattr(args, "json", False))
    prog = f"tokensieve {args.command}"
    from .errors import TokensieveError

    try:
        return COMMANDS[args.command](args, out)
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
