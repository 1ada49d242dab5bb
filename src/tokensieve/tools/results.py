"""The files and figures of ``tokensieve eval``: ``results.json`` (written so an interruption never leaves it broken,
read back for resuming, re-plotting and merging), ``results.md`` and ``results.png``.

Apart from running an evaluation because none of it needs a model or torch: saved results are read, merged, tabulated
and re-plotted from the files alone. Adaptive budgets fix a mean, not a count: table and plot put each one next to the
fixed budget of its mean (next row; in the plot the same colour, a dashed line and open squares), at the mean it
measured.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from ..adaptive import Adaptive
from ..errors import InputError
from .configs import VANILLA, format_budget

RESULTS_JSON = "results.json"
FORMAT = 2
"""``results.json`` layout: 2 = ``{"meta": ..., "records": [...]}``; files without ``format`` are the older bare
list of records, still readable for re-plotting and merging."""


def is_adaptive(record: dict) -> bool:
    """The record's budget (or one stage of its chain) is adaptive: its kept tokens are a measured mean."""
    budget = record.get("budget")
    return any(isinstance(b, str) for b in (budget if isinstance(budget, list) else [budget]))


def _twin_key(record: dict) -> str:
    """What pairs an adaptive record with the fixed record it compares to: same line, budget = the adaptive mean."""
    budget = record["budget"]
    mean = [
        Adaptive.parse(b).mean if isinstance(b, str) else b for b in (budget if isinstance(budget, list) else [budget])
    ]
    return json.dumps([_method_label(record), mean if isinstance(budget, list) else mean[0]])


def _table_rows(records: list[dict]) -> list[dict]:
    """Records in their order, each adaptive one moved right after the fixed budget of its method and mean."""
    fixed = {_twin_key(r) for r in records if r["method"] != VANILLA and not is_adaptive(r)}
    out = []
    for r in records:
        if is_adaptive(r) and _twin_key(r) in fixed:
            continue
        out.append(r)
        if r["method"] != VANILLA and not is_adaptive(r):
            out += [a for a in records if is_adaptive(a) and _twin_key(a) == _twin_key(r)]
    return out


def _adaptive_note(r: dict) -> str:
    a = r["adaptive"]
    cal = a["calibration"]
    fitted = (
        f"threshold fitted on {cal['images']} `{cal['split']}` images (mean there {cal['mean']:.2f})"
        if cal
        else "threshold given, no calibration"
    )
    lo, hi = a["kept_range"]
    return (
        f"- {_method_label(r)} at {format_budget(r['budget'])}: `{a['budget']}`, {fitted}; "
        f"test mean {r['kept_tokens']:.2f}, per question {lo:g} to {hi:g}"
    )


def markdown_table(records: list[dict], title: str = "") -> str:
    """One row per record, adaptive budgets next to the fixed budget of the same mean; a note per adaptive record
    (threshold, calibration, the per-question range its kept-token mean comes from)."""
    fams = list(records[0]["families"]) if records else []
    head = ["method", "budget", "kept tokens", "accuracy", "relative", "loyalty"] + fams
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = _table_rows(records)
    for r in rows:
        kept = f"{r['kept_tokens']:.1f}"
        if is_adaptive(r) and r.get("adaptive"):
            kept += " ({:g}-{:g})".format(*r["adaptive"]["kept_range"])
        cells = [
            r["method"],
            format_budget(r["budget"]),
            kept,
            f"{100 * r['accuracy']:.1f}",
            "-" if r["relative"] is None else f"{100 * r['relative']:.1f}%",
            f"{100 * r['loyalty']:.1f}%",
        ]
        cells += [f"{100 * r['families'][f]:.1f}" for f in fams]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [_adaptive_note(r) for r in rows if is_adaptive(r) and r.get("adaptive")]
    if notes:
        lines += [
            "",
            "Adaptive budgets keep a different count per image; their kept tokens are the measured mean over "
            "the questions (range per question in brackets), the threshold is fitted so the mean holds on "
            "calibration images, never test ones:",
            "",
        ] + notes
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    by_line = defaultdict(list)
    for r in records:
        if r["method"] != "none":
            by_line[(_method_label(r), _line_label(r), is_adaptive(r))].append((r["kept_tokens"], 100 * r["accuracy"]))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {m: cycle[i % len(cycle)] for i, m in enumerate(sorted({m for m, _, _ in by_line}))}
    for (method, name, adaptive), pts in sorted(by_line.items()):
        pts.sort()  # adaptive: the method's colour, dashed, squares; x is the measured mean
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="s" if adaptive else "o",
            label=name,
            color=colours[method],
            linestyle="--" if adaptive else "-",
            markerfacecolor="white" if adaptive else None,
        )
    for r in records:
        if r["method"] == "none":
            ax.axhline(
                100 * r["accuracy"],
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"full ({r['kept_tokens']:.0f} tokens)",
            )
            ax.plot([r["kept_tokens"]], [100 * r["accuracy"]], marker="*", color="black", markersize=10)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens kept per image (mean)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _method_label(record: dict) -> str:
    """A method with its hyper-parameters and scope (fastv with layer=1 is not fastv with layer=2): one colour."""
    extra = [
        f"{m}.{k}={v}"
        for m, p in sorted((record.get("params") or {}).items())
        if isinstance(p, dict)
        for k, v in sorted(p.items())
    ]
    if record.get("scope", "image") != "image":
        extra.append(f"scope={record['scope']}")
    return record["method"] + (f" ({', '.join(extra)})" if extra else "")


def _line_label(record: dict) -> str:
    """A plot line per method label, fixed and adaptive budgets apart (an adaptive line names its criterion when it
    is not the default)."""
    label = _method_label(record)
    if not is_adaptive(record):
        return label
    criterion = (record.get("adaptive") or {}).get("criterion", "coverage")
    return f"{label} adaptive" + ("" if criterion == "coverage" else f" ({criterion})")


def title_of(meta: dict | None, records: list[dict]) -> str:
    if not meta:
        return f"re-plotted results ({records[0]['questions'] if records else 0} questions)"
    name = "default model" if meta["model"]["model"] == "default" else meta["model"]["model"]
    return f"{meta['data']} {meta['split']} ({meta['questions']} questions), {name}"


def write_outputs(
    records: list[dict], out_dir: str | Path, title: str = "", meta: dict | None = None, plot_too: bool = True
) -> dict[str, Path]:
    """``results.json`` (metadata, records, per-question answers), ``results.md`` and ``results.png`` in ``out_dir``.

    The JSON is written to a temporary file and renamed, so an interrupted write never leaves a broken file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "md": out / "results.md", "png": out / "results.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(_dumps({"format": FORMAT, "meta": meta, "records": records}))
    tmp.replace(paths["json"])
    paths["md"].write_text(markdown_table(records, title))
    if plot_too:
        plot(records, paths["png"], title)
    return paths


_SCALAR_LIST = re.compile(r'\[\n(?:\s*(?:"(?:[^"\\\n]|\\.)*"|-?[\d.eE+-]+|true|false|null),?\n)+\s*\]')


def _dumps(payload) -> str:
    """Indented JSON with every list of plain values on one line (a thousand answers stay a thousand words, not a
    thousand lines)."""
    return _SCALAR_LIST.sub(
        lambda m: json.dumps(json.loads(m.group(0)), ensure_ascii=False),
        json.dumps(payload, indent=1, ensure_ascii=False),
    )


def read_results(path: str | Path, option: str = "--from") -> tuple[dict | None, list[dict]]:
    """``(meta, records)`` from a ``results.json`` (or the folder holding one); ``meta`` is ``None`` for files
    written before results carried metadata."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_JSON
    if not p.is_file():
        raise InputError(
            f"{option} {str(path)!r}: no {RESULTS_JSON} there; give a folder written by tokensieve eval "
            "or the file itself"
        )
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{option} {str(path)!r}: {p.name} cannot be read ({exc}); it is not a tokensieve eval result"
        ) from None
    if isinstance(data, list):
        return None, data
    if not isinstance(data, dict) or "records" not in data:
        raise InputError(f"{option} {str(path)!r}: {p.name} is not a tokensieve eval result (no records)")
    return data.get("meta"), data["records"]
