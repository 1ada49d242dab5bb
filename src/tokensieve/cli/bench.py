"""``tokensieve bench``: vanilla and every configuration timed in one process (the work is
:mod:`tokensieve.tools.bench`'s); falls back to a FLOPs table where a run would not fit or would take hours.

Arguments are checked before torch is imported, so a typo fails at once.
"""

from __future__ import annotations

from ..errors import InputError
from ..tools.configs import VANILLA, Config, group_params, parse_configs
from ..tools.inputs import check_question, load_image, prepare_out_dir
from .console import Out, load_with_note

CPU_GFLOPS = 100.0
"""Rough fp32 throughput of a 2-core CPU (this project's machine measured 120-130), for refusing hour-long runs."""


def _available_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def cmd_bench(args, out: Out) -> int:
    configs = parse_configs(args.methods, args.budgets)
    params = group_params(args.param, configs)
    for config in configs:
        config.sieve(params, args.scope)
    check_question(args.prompt)
    image = load_image(args.image) if args.image else None
    prepare_out_dir(args.out)

    import torch

    from ..models.archs import arch_config, arch_parameters, build_arch, synthetic_inputs
    from ..tools.bench import check_budgets, flops_only, model_probe, run_bench, write_results
    from ..tools.flops import count_flops, vanilla_trace

    configs = [Config((VANILLA,))] + configs
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            f"--device {device}: this torch ({torch.__version__}) has no usable CUDA device; drop --device (CPU), or "
            "install a CUDA build of torch on a machine with a GPU"
        )
    if args.model:
        from ..models.loading import check_model_dir, model_path

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
        model, _ = load_with_note(args.model, out, dtype=dtype, device=device, with_processor=False)
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
