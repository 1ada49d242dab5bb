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
    run.add_argument("--budget", type=_budget, default=64, help="int: tokens kept per image; float: keep ratio")
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
    ev.add_argument("--out", required=True, help="directory for results.json, results.md, results.png")

    tiny = sub.add_parser("make-tiny", help="save the tiny random-weight demo LLaVA (model + processor) to DIR")
    tiny.add_argument("dir")
    return parser


def _load(args, console: Console):
    from .evaluate import load_model
    from .tiny import build_tiny_llava

    if args.tiny:
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

    sieve = Sieve(args.method, args.budget, scope=args.scope, **dict(args.param))  # validate before loading
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
    )
    if args.json:
        print(json.dumps(result))
        return 0
    table = Table(show_header=False, box=None)
    table.add_row("prompt", repr(prompt))
    table.add_row("answer", repr(result["answer"]) + (f" (expected {result['expected']!r})" if "expected" in result
                                                      else ""))
    table.add_row("visual tokens", f"{report.tokens_in} -> {report.tokens_out} ({sieve.name}, budget {args.budget})")
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

    records = run_eval(args.model, args.data, args.methods, args.budgets, args.out, limit=args.limit,
                       batch_size=args.batch_size, console=console)
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


def main(argv: list[str] | None = None) -> int:
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
        return cmd_run(args, console)
    except (TokensieveError, TypeError, ValueError, FileNotFoundError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
