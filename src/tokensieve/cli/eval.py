"""``tokensieve eval``: accuracy retention on a benchmark (the work is :mod:`tokensieve.tools.evaluate`'s).

Arguments are checked before anything heavy is imported, so a typo fails at once.
"""

from __future__ import annotations

from ..tools.configs import group_params, parse_configs
from ..tools.inputs import prepare_out_dir
from .console import Out, model_note, quiet_loading
from .defaults import EVAL_BUDGETS, EVAL_METHODS


def cmd_eval(args, out: Out) -> int:
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
        from ..tools.evaluate import merge_results

        result = merge_results(args.sources, args.out, log=out.note)
    else:
        configs = parse_configs(
            EVAL_METHODS if args.methods is None else args.methods,
            EVAL_BUDGETS if args.budgets is None else args.budgets,
            calibrates=True,
        )
        params = group_params(args.param, configs)
        for config in configs:
            config.sieve(params, args.scope)  # chains, budgets and parameters, before anything runs
        prepare_out_dir(args.out)
        from ..tools.evaluate import run_eval

        model_note(args.model, out)
        quiet_loading()
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
    from ..tools.results import markdown_table

    table = markdown_table(result["records"], result["title"])
    if out.console.is_terminal:
        from rich.markdown import Markdown

        out.console.print(Markdown(table))
    else:
        print(table, end="")
    out.note(f"wrote results.json, results.md, results.png to {args.out}")
    return 0
