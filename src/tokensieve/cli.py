"""Command line: ``run`` answers one question under a method, ``eval`` measures accuracy retention on a benchmark,
``methods`` lists methods. Without ``--model`` both use the embedded default model (trained, small)."""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time

from rich.console import Console
from rich.table import Table

TINY_NOTE = (
    "NOTE: --tiny runs a TINY RANDOM-WEIGHT LLaVA built from a config. Its answers are meaningless; the run shows "
    "the plumbing, token counts and timings only."
)
DEFAULT_NOTE = (
    "Using the embedded default model: a small LLaVA trained from scratch on tokensieve's shapes benchmark and "
    "easy-VQA. It answers one-word questions about simple synthetic scenes, nothing else."
)
DEMO_SAMPLE = 4  # a shapes test scene with a tiny object; its own question is the default prompt


def _budget(text: str):
    if "+" in text:  # one budget per chained method: 192+128
        return [_budget(part) for part in text.split("+")]
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"budget must be an int (tokens per image) or a float in (0, 1] (keep ratio), got {text!r}"
            ) from None


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method name")
    return names


def _budgets(text: str) -> list:
    return [_budget(t.strip()) for t in text.split(",") if t.strip()]


def _param(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param expects NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensieve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the available methods")

    run = sub.add_parser("run", help="answer one prompt about one image with a method applied")
    run.add_argument("--model", help="model directory (AutoModelForImageTextToText); default: the embedded model")
    run.add_argument("--tiny", action="store_true", help="use the tiny random-weight demo model instead (fast)")
    run.add_argument("--method", default="evocut")
    run.add_argument("--budget", type=_budget, default=64, help="int: tokens kept per image; float: keep ratio; "
                     "chained methods take one each (--method evocut+fastv --budget 192+128)")
    run.add_argument("--scope", default="image", help="what the budget applies to (image, crop, frame, global)")
    run.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                     help="method hyper-parameter, repeatable (e.g. --param start_layer=10)")
    run.add_argument("--image", help="image file; default: a generated scene")
    run.add_argument("--prompt", help="default: the generated scene's own question")
    run.add_argument("--max-new-tokens", type=int, default=16)
    run.add_argument("--compare", action="store_true", help="also answer without compression, for comparison")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    ev = sub.add_parser("eval", help="accuracy of the full-token model and of each method x budget on a test set")
    ev.add_argument("--model", help="model directory; default: the embedded model")
    ev.add_argument("--data", choices=("shapes", "easyvqa"), default="shapes")
    ev.add_argument("--methods", type=_names, default=["evocut", "random", "pool"], help="comma-separated")
    ev.add_argument("--budgets", type=_budgets, default=[0.5, 0.25, 0.125, 0.0625], help="comma-separated")
    ev.add_argument("--limit", type=int, help="only the first N test questions")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--param", type=_param, action="append", default=[], metavar="METHOD.NAME=VALUE",
                    help="hyper-parameter of one method, repeatable (e.g. --param fastv.layer=1)")
    ev.add_argument("--out", required=True, help="directory for results.json, results.md, results.png")

    tiny = sub.add_parser("make-tiny", help="save the tiny random-weight demo LLaVA (model + processor) to DIR")
    tiny.add_argument("dir")
    add_measure_commands(sub)
    # handled in main() before parsing: every argument after it belongs to lmms-eval (tokensieve.lmms_eval.launch)
    sub.add_parser("lmms-eval", add_help=False, help="run lmms-eval offline with --model tokensieve and the packaged "
                   "tasks (pip install tokensieve[lmms-eval]; `tokensieve lmms-eval --help`)")
    return parser


def _load(args, console: Console):
    from .evaluate import load_model
    from .tiny import build_tiny_llava

    if getattr(args, "tiny", False):
        if args.model:
            raise ValueError("give either --model or --tiny, not both")
        if not args.json:
            console.print(f"[bold yellow]{TINY_NOTE}[/]")
        return build_tiny_llava()
    if not args.model and not args.json:
        console.print(f"[cyan]{DEFAULT_NOTE}[/]")
    return load_model(args.model)


def _model_name(args) -> str:
    return args.model or ("tiny-random-llava" if args.tiny else "default")


def cmd_run(args, console: Console) -> int:
    import torch
    from PIL import Image

    from .data import shapes
    from .session import Sieve
    from .tiny import demo_image
    from .train import prompt_text

    methods = args.method.split("+") if "+" in args.method else args.method
    sieve = Sieve(methods, args.budget, scope=args.scope, **dict(args.param))  # validate before loading
    model, processor = _load(args, console)
    demo = shapes.sample("test", DEMO_SAMPLE)
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        image = demo_image() if args.tiny else demo.image
    prompt = args.prompt or ("What is in the picture?" if args.tiny or args.image else demo.question)
    inputs = processor(images=[image], text=[prompt_text(processor, prompt)], return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    def answer(out):
        return processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)[0].strip()

    result = {"model": _model_name(args), "method": sieve.name, "budget": args.budget, "prompt": prompt}
    if not (args.tiny or args.image or args.prompt):
        result["expected"] = demo.answer
    with torch.inference_mode():
        if args.compare:
            t0 = time.perf_counter()
            vanilla = model.generate(**inputs, **gen_kwargs)
            result["vanilla"] = {"answer": answer(vanilla), "generate_s": time.perf_counter() - t0}
        with sieve(model):
            t0 = time.perf_counter()
            out = model.generate(**inputs, **gen_kwargs)
            elapsed = time.perf_counter() - t0
    report = sieve.last_report
    result.update(
        answer=answer(out),
        generate_s=elapsed,
        visual_tokens_in=report.tokens_in,
        visual_tokens_out=report.tokens_out,
        seq_len_in=report.seq_len_in,
        seq_len_out=report.seq_len_out,
        encode_s=report.encode_s,
        selection_s=report.selection_s,
        llm_visual_tokens_avg=report.llm_visual_tokens_avg[0] if report.llm_visual_tokens_avg else report.tokens_out,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    table = Table(show_header=False, box=None)
    table.add_row("prompt", repr(prompt))
    table.add_row("answer", repr(result["answer"]) + (f" (expected {result['expected']!r})" if "expected" in result
                                                      else ""))
    table.add_row("visual tokens", f"{report.tokens_in} -> {report.tokens_out} ({sieve.name}, budget {args.budget})")
    if report.llm_budget:
        table.add_row("in the LM", f"{result['llm_visual_tokens_avg']:.1f} visual tokens averaged over decoder layers")
    table.add_row("prompt length", f"{report.seq_len_in} -> {report.seq_len_out} tokens")
    table.add_row("encode + select", f"{report.encode_s * 1e3:.1f} ms (selection {report.selection_s * 1e3:.2f} ms)")
    table.add_row("generate total", f"{elapsed * 1e3:.1f} ms for up to {args.max_new_tokens} new tokens")
    if args.compare:
        v = result["vanilla"]
        table.add_row("vanilla answer", repr(v["answer"]))
        table.add_row("vanilla generate", f"{v['generate_s'] * 1e3:.1f} ms")
    console.print(table)
    return 0


def cmd_methods(console: Console) -> int:
    from .session import list_methods

    table = Table(title="tokensieve methods")
    for col in ("name", "stage", "signals", "description"):
        table.add_column(col)
    for m in list_methods():
        table.add_row(m.name, m.stage, ", ".join(m.signals) or "-", m.description)
    console.print(table)
    return 0


def cmd_eval(args, console: Console) -> int:
    from .evaluate import run_eval

    from rich.markdown import Markdown

    from .evaluate import markdown_table

    params: dict[str, dict] = {}
    for key, value in args.param:
        method, dot, name = key.partition(".")
        if not dot or method not in args.methods:
            raise ValueError(f"--param {key}={value!r}: name it METHOD.NAME with METHOD one of --methods {args.methods}")
        params.setdefault(method, {})[name] = value
    records = run_eval(args.model, args.data, args.methods, args.budgets, args.out, limit=args.limit,
                       batch_size=args.batch_size, console=console, params=params)
    console.print(Markdown(markdown_table(records)))
    console.print(f"wrote results.json, results.md, results.png to {args.out}")
    return 0


def cmd_make_tiny(args, console: Console) -> int:
    from .tiny import build_tiny_llava

    model, processor = build_tiny_llava()
    model.save_pretrained(args.dir)
    processor.save_pretrained(args.dir)
    console.print(f"saved tiny random-weight LLaVA to {args.dir}")
    return 0


# -- tokensieve bench / tokensieve show ------------------------------------------------------------------------

CPU_GFLOPS = 100.0
"""Rough fp32 throughput of a 2-core CPU (this project's machine measured 120-130), for refusing hour-long runs."""


def add_measure_commands(sub) -> None:
    bench = sub.add_parser("bench", help="time vanilla and methods interleaved; table, bench.json and a plot")
    src = bench.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory (AutoModelForImageTextToText + processor)")
    src.add_argument("--arch", help="random-weight real-size architecture (default llava15-cpu); see tokensieve.archs")
    bench.add_argument("--methods", default="evocut,divprune", help="comma-separated method names")
    bench.add_argument("--budgets", default="64", help="comma-separated budgets (int tokens or float keep ratio)")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--warmup", type=int, default=1, help="unrecorded rounds before the repeats")
    bench.add_argument("--new-tokens", type=int, default=8, help="tokens generated per call (decode timing)")
    bench.add_argument("--text-tokens", type=int, default=40, help="text tokens around the image (--arch)")
    bench.add_argument("--image", help="image for --model; default: a generated scene")
    bench.add_argument("--prompt", default="What is in the picture?")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--device", help="cpu or cuda; default cuda when available")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--flops-only", action="store_true", help="write the FLOPs table from the config, run nothing")
    bench.add_argument("--force", action="store_true", help="measure even when the run would take very long")
    bench.add_argument("--out", default="bench-results", help="output directory")

    show = sub.add_parser("show", help="draw kept tokens (and merge groups) on an image, methods side by side")
    show.add_argument("--method", required=True, help="method name, or several separated by commas")
    show.add_argument("--budget", type=_budget, default=64)
    show.add_argument("--image", help="image file; default: a generated scene")
    show.add_argument("--out", required=True, help="PNG file to write")
    src = show.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory; default: the embedded default model")
    src.add_argument("--arch", help="random-weight architecture instead (e.g. llava15-cpu: a 24x24 grid)")
    show.set_defaults(json=False)


def _available_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _open_image(path: str | None):
    from PIL import Image

    from .tiny import demo_image

    if not path:
        return demo_image()
    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(f"cannot read image {path!r}: {exc}") from None


def cmd_bench(args, console: Console) -> int:
    import torch

    from .archs import arch_config, arch_parameters, build_arch, synthetic_inputs
    from .bench import flops_only, parse_configs, run_bench, write_results
    from .budget import Budget
    from .flops import count_flops, dims_from_config, vanilla_trace

    configs = parse_configs(args.methods, args.budgets)
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1:
        raise ValueError("--repeats and --new-tokens must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model)
        config = AutoConfig.from_pretrained(args.model)
        name = args.model
    else:
        name = args.arch or "llava15-cpu"
        config = arch_config(name)
    image_tokens = dims_from_config(config).image_tokens
    for cfg in configs[1:]:
        Budget.parse(cfg.budget).resolve(image_tokens, what="each image of this model")
    if args.model:
        image = _open_image(args.image)
        from .train import prompt_text

        probe = processor(images=[image], text=[prompt_text(processor, args.prompt)], return_tensors="pt")
    else:
        probe = synthetic_inputs(config, text_tokens=args.text_tokens)
    title = f"tokensieve bench: {name}"
    need = arch_parameters(config) * torch.finfo(dtype).bits // 8
    avail = _available_bytes(device)
    reason = "--flops-only given" if args.flops_only else None
    if reason is None and need * 1.15 + (1 << 30) > avail:
        reason = (f"{name} needs about {need / 1e9:.1f} GB of weights in {args.dtype} and this {device} has "
                  f"{avail / 1e9:.1f} GB available")
    if reason is None and device == "cpu" and not args.force:
        flops = count_flops(config, vanilla_trace(config, probe["input_ids"], new_tokens=args.new_tokens)).total
        est = flops / (CPU_GFLOPS * 1e9) * len(configs) * (args.repeats + args.warmup)
        if est > 1800:
            reason = (f"measuring would take roughly {est / 60:.0f} min on this CPU at ~{CPU_GFLOPS:.0f} GFLOP/s "
                      "(pass --force to run anyway)")
    if reason is not None:
        note = (f"FLOPs only, from the config (no weights, nothing run): {reason}. Exact for pre- and "
                "post-projector methods; timing needs enough memory or a GPU.")
        console.print(f"[bold yellow]{note}[/]")
        result = flops_only(config, probe, configs, new_tokens=args.new_tokens)
        result["meta"].update(note=note, model=name)
        paths = write_results(result, args.out, title)
        print(paths["md"].read_text())
        console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
    if args.model:
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(device).eval()
        batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in probe.items()}
    else:
        console.print(f"building {name} (random weights, {args.dtype}, {device}) ...")
        model = build_arch(name, dtype=dtype, device=device)
        batch = synthetic_inputs(model, text_tokens=args.text_tokens)
    result = run_bench(model, batch, configs, repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
                       log=console.print)
    result["meta"].update(model=name, prompt_tokens=int(batch["input_ids"].shape[1]))
    paths = write_results(result, args.out, title)
    print(paths["md"].read_text())
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_show(args, console: Console) -> int:
    from .budget import Budget
    from .methods import get_method
    from .show import image_batch, model_view, panels_for, render

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods:
        raise ValueError("--method is empty")
    for m in methods:
        get_method(m)
    Budget.parse(args.budget)
    image = _open_image(args.image)
    if args.arch:
        from .archs import build_arch

        model, image_processor = build_arch(args.arch), None
        name = args.arch
    else:
        model, processor = _load(args, console)
        image_processor = getattr(processor, "image_processor", None)
        name = args.model or "default model"
    batch = image_batch(model, image, image_processor)
    panels = panels_for(model, batch, methods, args.budget)
    path = render(model_view(image), panels, args.out, suptitle=f"{name}: bright = kept, tinted = merged, dim = dropped")
    for p in panels:
        console.print(f"{p.title}: {len(p.kept)} kept patches, {len(p.merged_cells)} merge groups")
    console.print(f"wrote {path}")
    return 0


MEASURE_COMMANDS = {"bench": cmd_bench, "show": cmd_show}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lmms-eval"]:
        from .lmms_eval.launch import main as lmms_eval_main

        return lmms_eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    console = Console()
    from .errors import TokensieveError

    try:
        if args.command == "methods":
            return cmd_methods(console)
        if args.command == "make-tiny":
            return cmd_make_tiny(args, console)
        if args.command == "eval":
            return cmd_eval(args, console)
        if args.command in MEASURE_COMMANDS:
            return MEASURE_COMMANDS[args.command](args, console)
        return cmd_run(args, console)
    except (TokensieveError, TypeError, ValueError, FileNotFoundError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
