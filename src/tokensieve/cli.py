"""Command line: ``tokensieve run`` answers one question under a method; ``tokensieve methods`` lists methods."""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time

from rich.console import Console
from rich.table import Table

TINY_NOTE = (
    "NOTE: no --model given and no trained default model ships yet, so this runs a TINY RANDOM-WEIGHT LLaVA built "
    "from a config. Its answers are meaningless; the run shows the plumbing, token counts and timings only."
)


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
    run.add_argument("--model", help="model directory (AutoModelForImageTextToText); default: built-in tiny demo")
    run.add_argument("--method", default="evocut")
    run.add_argument("--budget", type=_budget, default=64, help="int: tokens kept per image; float: keep ratio; "
                     "chained methods take one each (--method evocut+fastv --budget 192+128)")
    run.add_argument("--scope", default="image", help="what the budget applies to (image, crop, frame, global)")
    run.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                     help="method hyper-parameter, repeatable (e.g. --param start_layer=10)")
    run.add_argument("--image", help="image file; default: a generated scene")
    run.add_argument("--prompt", default="What is in the picture?")
    run.add_argument("--max-new-tokens", type=int, default=16)
    run.add_argument("--compare", action="store_true", help="also answer without compression, for comparison")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    tiny = sub.add_parser("make-tiny", help="save the tiny random-weight demo LLaVA (model + processor) to DIR")
    tiny.add_argument("dir")
    return parser


def _load(args, console: Console):
    import torch

    from .tiny import build_tiny_llava

    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model)
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
        return model, processor
    if not args.json:
        console.print(f"[bold yellow]{TINY_NOTE}[/]")
    return build_tiny_llava()


def _prompt_text(processor, prompt: str) -> str:
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{processor.image_token}\n{prompt}"


def cmd_run(args, console: Console) -> int:
    import torch
    from PIL import Image

    from .session import Sieve
    from .tiny import demo_image

    methods = args.method.split("+") if "+" in args.method else args.method
    sieve = Sieve(methods, args.budget, scope=args.scope, **dict(args.param))  # validate before loading
    model, processor = _load(args, console)
    image = Image.open(args.image).convert("RGB") if args.image else demo_image()
    inputs = processor(images=[image], text=[_prompt_text(processor, args.prompt)], return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    def answer(out):
        return processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)[0].strip()

    result = {"model": args.model or "tiny-random-llava", "method": sieve.name, "budget": args.budget}
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
    table.add_row("answer", repr(result["answer"]))
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
        return cmd_run(args, console)
    except (TokensieveError, TypeError, ValueError, FileNotFoundError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
