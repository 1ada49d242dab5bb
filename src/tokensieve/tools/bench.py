"""``tokensieve bench``: vanilla and each method on one model and one prompt, interleaved, timed and FLOP-counted.

Why interleaved in one process: on a shared machine load drifts over minutes; running every configuration once per
round (rotating which goes first) spreads that drift over all of them instead of biasing the last ones. Each
measured ratio sits beside the FLOPs-ideal ratio from the same call's token trace, so the gap between "FLOPs
saved" and "time saved" is visible in one row.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from ..budget import Budget
from ..methods import get_method
from ..methods.base import POST_PROJECTOR, PRE_PROJECTOR
from .configs import Config
from .flops import Flops, analytic_trace, count_flops, dims_from_config, trace_from_report, vanilla_trace
from .measure import Spread, measure_call


def _flops_row(flops: Flops) -> dict:
    return flops.to_dict()


def run_bench(
    model,
    batch: dict,
    configs: list[Config],
    *,
    repeats: int = 5,
    warmup: int = 1,
    new_tokens: int = 8,
    log=print,
    params: dict | None = None,
    scope: str = "image",
) -> dict:
    """Measure every configuration ``repeats`` times after ``warmup`` unrecorded rounds; return rows of results.

    ``params`` maps a method name to its hyper-parameters, as ``--param METHOD.NAME=VALUE`` gives them."""
    samples: dict[str, list] = {c.label: [] for c in configs}
    last_reports: dict[str, object] = {}
    for rnd in range(warmup + repeats):
        shift = rnd % len(configs)
        order = configs[shift:] + configs[:shift]
        for cfg in order:
            sieve = None if cfg.is_vanilla else cfg.sieve(params, scope)
            timing, report = measure_call(model, batch, sieve, new_tokens=new_tokens)
            if rnd >= warmup:
                samples[cfg.label].append(timing)
            last_reports[cfg.label] = report
        if rnd >= warmup:
            log(
                f"round {rnd - warmup + 1}/{repeats}: "
                + ", ".join(f"{c.label} {samples[c.label][-1].ttft_s:.3f}s" for c in configs)
            )
    rows = []
    vanilla_flops = count_flops(model.config, vanilla_trace(model.config, **batch, new_tokens=new_tokens))
    for cfg in configs:
        report = last_reports[cfg.label]
        flops = (
            vanilla_flops
            if report is None
            else count_flops(model.config, trace_from_report(report, new_tokens=new_tokens))
        )
        runs = samples[cfg.label]
        row = dict(
            config=cfg.label,
            method=cfg.method,
            budget=cfg.budget,
            params={m: (params or {})[m] for m in cfg.methods if (params or {}).get(m)},
            visual_tokens=flops.trace.llm_layer_visual_tokens[0][0] if flops.trace.llm_layer_visual_tokens else 0,
            llm_visual_tokens_avg=(
                sum(flops.trace.llm_layer_visual_tokens[0]) / len(flops.trace.llm_layer_visual_tokens[0])
                if flops.trace.llm_layer_visual_tokens
                else 0
            ),
            stage=None if report is None else report.stage,
            flops=_flops_row(flops),
        )
        for key in (
            "ttft_s",
            "vision_s",
            "selection_s",
            "prefill_s",
            "decode_ms_per_token",
            "peak_memory_bytes",
            "kv_cache_bytes",
        ):
            spread = Spread.of(getattr(r, key) for r in runs)
            row[key] = spread.to_dict() if spread else None
        row["memory_method"] = runs[0].memory_method if runs else None
        rows.append(row)
    _add_ratios(rows)
    return dict(meta=machine_meta(model, repeats, warmup, new_tokens), rows=rows)


def _med(row, key):
    return row[key]["median"] if row.get(key) else None


def _add_ratios(rows: list[dict]) -> None:
    base = rows[0]
    for row in rows:
        f, bf = row["flops"], base["flops"]
        row["flops_ideal_ttft_speedup"] = bf["to_first_token"] / f["to_first_token"]
        row["flops_ideal_prefill_speedup"] = bf["prefill"] / f["prefill"]
        ttft = _med(row, "ttft_s")
        if ttft is not None and _med(base, "ttft_s") is not None:
            row["ttft_speedup"] = _med(base, "ttft_s") / ttft
            row["prefill_speedup"] = _med(base, "prefill_s") / max(_med(row, "prefill_s"), 1e-12)
            row["selection_share"] = _med(row, "selection_s") / ttft


def machine_meta(model, repeats: int, warmup: int, new_tokens: int) -> dict:
    param = next(model.parameters())
    device = param.device
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        dtype=str(param.dtype).replace("torch.", ""),
        repeats=repeats,
        warmup=warmup,
        new_tokens=new_tokens,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )


def check_budgets(config, configs: list[Config]) -> None:
    """Refuse, before any model is built, a budget that cannot fit this model (the rule set's check against the
    family's facts from the config alone); budgets whose fit depends on the input are checked per call."""
    from .. import plan
    from ..adapters import adapter_class

    target = adapter_class(config).describe(config)
    for cfg in configs:
        if not cfg.is_vanilla:
            plan.check_budget(Budget.parse(cfg.budgets[0]), target)


def model_probe(
    model_dir, config, image=None, prompt: str = "What is in the picture?", text_tokens: int = 40, log=print, warn=None
) -> dict:
    """The batch ``bench --model`` times: the model's own processor on ``image`` (default: a generated scene) and
    the chat-formatted ``prompt``; when the processor cannot be loaded here (LLaVA-OneVision's, NeXT-Video's and
    Qwen-VL's need torchvision for their video part), synthetic inputs of the family's layout instead, which is
    all timing and FLOPs depend on (``tokensieve.models.archs.synthetic_inputs``)."""
    from ..models.archs import synthetic_inputs
    from ..models.loading import load_processor
    from .inputs import build_prompt

    try:
        processor = load_processor(model_dir)
    except Exception as exc:  # noqa: BLE001 - any failure to build the processor means: no processor here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if image is not None:
            raise ValueError(f"--image needs the model's processor, which cannot be loaded here ({reason})") from None
        log(
            f"the processor of {model_dir} cannot be loaded here ({reason}); timing synthetic inputs of the same "
            f"layout (one image, {text_tokens} text tokens) instead"
        )
        return synthetic_inputs(config, text_tokens=text_tokens)
    from ..models.tiny import demo_image

    text, notes = build_prompt(processor, prompt)
    for note in notes:
        (warn or log)(note)
    image = demo_image() if image is None else image
    return dict(processor(images=[image], text=[text], return_tensors="pt"))


def flops_only(config, batch: dict, configs: list[Config], new_tokens: int = 8) -> dict:
    """FLOPs of every configuration from the config alone (no weights, no run).

    Vanilla is exact on every family. Pre- and post-projector methods are exact on the LLaVA-1.5 layout, whose
    trace is fixed by the budget; in-encoder and in-LLM methods (and every method on families whose kept count
    depends on crops, newlines or frames) shrink tokens inside the model, so their rows are left out with a note.
    """
    dims = dims_from_config(config)
    base_trace = vanilla_trace(config, **batch, new_tokens=new_tokens)
    n_img = base_trace.num_images
    text = base_trace.llm_layer_tokens[0][0] - base_trace.llm_layer_visual_tokens[0][0]
    rows = []
    for cfg in configs:
        row = dict(config=cfg.label, method=cfg.method, budget=cfg.budget)
        if cfg.is_vanilla:
            trace = base_trace
        else:
            stages = [get_method(m).stage for m in cfg.methods]
            stage = "+".join(stages)
            row["stage"] = stage
            if any(s not in (PRE_PROJECTOR, POST_PROJECTOR) for s in stages) or dims.family != "llava":
                what = f"{stage} method" if dims.family == "llava" else f"{stage} method on {dims.family}"
                row["note"] = f"{what}: its trace depends on the run; FLOPs need a measured call"
                rows.append(row)
                continue
            k = Budget.parse(cfg.budgets[0]).resolve(dims.image_tokens, what="each image")
            projected = dims.image_tokens * n_img if stage == POST_PROJECTOR else k * n_img
            trace = analytic_trace(
                config,
                text_tokens=text,
                visual_tokens=k * n_img,
                projected_tokens=projected,
                num_images=n_img,
                new_tokens=new_tokens,
            )
        flops = count_flops(dims, trace)
        row.update(visual_tokens=trace.llm_layer_visual_tokens[0][0], flops=_flops_row(flops))
        rows.append(row)
    base = rows[0]["flops"]
    for row in rows:
        if "flops" in row:
            row["flops_ideal_ttft_speedup"] = base["to_first_token"] / row["flops"]["to_first_token"]
            row["flops_ideal_prefill_speedup"] = base["prefill"] / row["flops"]["prefill"]
    return dict(meta=dict(mode="flops-only", new_tokens=new_tokens), rows=rows)


# -- writing --------------------------------------------------------------------------------------------------


def _g(x: float) -> str:
    return f"{x / 1e9:.4g}"


def flops_table(rows: list[dict]) -> list[str]:
    lines = [
        "| config | visual tokens | vision GFLOPs | projector | LM prefill | to first token | FLOPs-ideal speed-up "
        "| FastV Eq.5 GMACs | PDrop GMACs | decode GFLOPs/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "flops" not in r:
            lines.append(f"| {r['config']} | - | {r.get('note', '')} | | | | | | | |")
            continue
        f = r["flops"]
        per_token = f.get("decode_per_token")
        lines.append(
            f"| {r['config']} | {r['visual_tokens']} | {_g(f['vision'])} | {_g(f['projector'])} | {_g(f['prefill'])} "
            f"| {_g(f['to_first_token'])} | {r['flops_ideal_ttft_speedup']:.2f}x | {_g(f['fastv_eq5_macs'])} "
            f"| {_g(f['pdrop_macs'])} | {'-' if per_token is None else _g(per_token)} |"
        )
    return lines


def timing_table(rows: list[dict]) -> list[str]:
    lines = [
        "| config | visual tokens | TTFT s (min-max) | TTFT speed-up | FLOPs-ideal | vision s | selection ms "
        "(% TTFT) | prefill s | prefill speed-up (ideal) | decode ms/token | peak mem MB | KV cache MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["ttft_s"]
        dec = _med(r, "decode_ms_per_token")
        peak = _med(r, "peak_memory_bytes")
        lines.append(
            f"| {r['config']} | {r['visual_tokens']} | {t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f}) "
            f"| {r['ttft_speedup']:.2f}x | {r['flops_ideal_ttft_speedup']:.2f}x | {_med(r, 'vision_s'):.3f} "
            f"| {1e3 * _med(r, 'selection_s'):.1f} ({100 * r['selection_share']:.2f}%) | {_med(r, 'prefill_s'):.3f} "
            f"| {r['prefill_speedup']:.2f}x ({r['flops_ideal_prefill_speedup']:.2f}x) "
            f"| {'-' if dec is None else f'{dec:.1f}'} | {'-' if peak is None else f'{peak / 2**20:.0f}'} "
            f"| {_med(r, 'kv_cache_bytes') / 2**20:.2f} |"
        )
    return lines


def plot(result: dict, path: Path, title: str) -> None:
    """TTFT split into vision / selection / prefill per configuration, and measured vs FLOPs-ideal speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "flops" in r]
    labels = [r["config"] for r in rows]
    x = range(len(rows))
    measured = all(r.get("ttft_s") for r in rows)
    n_axes = 2 if measured else 1
    fig, axes = plt.subplots(1, n_axes, figsize=((2.5 + 0.75 * len(rows)) * n_axes, 4.5), squeeze=False)
    axes = axes[0]
    if measured:
        ax = axes[0]
        bottom = [0.0] * len(rows)
        for key, colour in (("vision_s", "#4c72b0"), ("selection_s", "#dd8452"), ("prefill_s", "#55a868")):
            vals = [_med(r, key) for r in rows]
            ax.bar(x, vals, bottom=bottom, color=colour, label=key[:-2])
            bottom = [b + v for b, v in zip(bottom, vals)]
        med = [r["ttft_s"]["median"] for r in rows]
        err = [[m - r["ttft_s"]["min"] for m, r in zip(med, rows)], [r["ttft_s"]["max"] - m for m, r in zip(med, rows)]]
        ax.errorbar(x, med, yerr=err, fmt="none", ecolor="black", capsize=3, label="TTFT min-max")
        ax.set_ylabel("time to first token, s (median)")
        ax.set_xticks(list(x), labels, rotation=30, ha="right")
        ax.legend(fontsize=8)
        ax.set_title("where the time goes")
    ax = axes[-1]
    width = 0.4 if measured else 0.6
    ideal = [r["flops_ideal_ttft_speedup"] for r in rows]
    if measured:
        ax.bar(
            [i - width / 2 for i in x],
            [r["ttft_speedup"] for r in rows],
            width,
            label="measured TTFT speed-up",
            color="#4c72b0",
        )
        ax.bar([i + width / 2 for i in x], ideal, width, label="FLOPs-ideal", color="#c7c7c7")
    else:
        ax.bar(list(x), ideal, width, label="FLOPs-ideal speed-up to first token", color="#c7c7c7")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("speed-up vs vanilla (x)")
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.legend(fontsize=8)
    ax.set_title("speed-up")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: dict, out_dir: str | Path, title: str) -> dict[str, Path]:
    """``bench.json`` (every number), ``bench.md`` (tables), ``bench.png`` (plot)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = result["meta"]
    lines = [f"# {title}", ""]
    if meta.get("mode") == "flops-only":
        lines += [meta.get("note", "FLOPs from the config only; nothing was run."), ""]
    else:
        lines += [
            f"{meta['device']}, {meta['threads']} threads, torch {meta['torch']}, {meta['dtype']}; "
            f"greedy generate of {meta['new_tokens']} tokens; median of {meta['repeats']} interleaved repeats "
            f"after {meta['warmup']} warm-up round(s); {meta['date']}.",
            "",
            *timing_table(result["rows"]),
            "",
        ]
    lines += [
        "FLOPs from each call's token trace (true FLOPs = 2 x MACs; paper conventions are LM prefill only, in MACs):",
        "",
        *flops_table(result["rows"]),
    ]
    paths = dict(json=out / "bench.json", md=out / "bench.md", png=out / "bench.png")
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    paths["md"].write_text("\n".join(lines) + "\n")
    plot(result, paths["png"], title)
    return paths
