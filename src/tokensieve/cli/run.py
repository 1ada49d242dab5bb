"""``tokensieve run``: one question about one image under a method, to see what it keeps and what the model answers.

Its timing is a first look, not a measurement (``tokensieve bench`` measures): one cold call, or with ``--compare``
a few calls of each alternating after a warm-up each, so neither side gets the cold start or the drift.
"""

from __future__ import annotations

import json
import time

from .console import Out, load_with_note
from .defaults import GENERIC_QUESTION

DEMO_SAMPLE = 4  # a shapes test scene with a tiny object; its own question is the default prompt
DEFAULT_IMAGE_QUESTION = "how many shapes are there ?"  # the default model counts shapes reliably


def cmd_run(args, out: Out) -> int:
    from ..tools.configs import format_budget, group_params, parse_configs
    from ..tools.inputs import check_question, load_image

    if args.tiny:
        if args.model:
            raise ValueError("give either --model or --tiny, not both")
        args.model = "tiny"
    configs = parse_configs(args.methods, args.budgets, method_option="--method", budget_option="--budget", single=True)
    params = group_params(args.param, configs)
    sieve = configs[0].sieve(params, args.scope)  # every check that needs no model, before loading one
    question = check_question(args.prompt)
    image = load_image(args.image) if args.image else None
    model, processor = load_with_note(args.model, out)

    import torch

    from ..data import shapes
    from ..models.loading import DEFAULT_MODEL, EMBEDDED_MODELS
    from ..tools.inputs import build_prompt

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
