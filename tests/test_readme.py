"""Every command in the README, from the root of a fresh copy of the repository.

Commands come from fenced ``bash`` blocks and from inline code spans that start with ``tokensieve `` or ``python ``.
A ``tokensieve`` command that finishes in seconds on the tiny or default model runs for real (in-process); any other
``tokensieve`` command is parsed, its method names and budgets checked, and not run; other programs are skipped with
the reason, except that ``python some/script.py`` must name a file in the repository. The tables below decide, so a
command added later lands somewhere sensible by default: an unknown ``tokensieve`` subcommand (a serving or
lmms-eval launcher) is parsed only, an unknown program (``vllm``, ``lmms-eval``, ``accelerate``) is skipped.
Models outside the repository are written ``path/to/...`` in the README.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from tokensieve.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

RUN = {"methods", "run", "show", "make-tiny", "eval", "bench"}
"""``tokensieve`` subcommands that run here unless a rule below makes them parse-only."""
PARSE_ONLY = [
    (
        lambda a: getattr(a, "arch", None) not in (None, "tiny") and not getattr(a, "flops_only", False),
        "builds a real-size random-weight model (GBs, minutes)",
    ),
    (lambda a: "path/to/" in str(getattr(a, "model", None) or ""), "needs a model that is not in the repository"),
    (lambda a: a.command == "eval" and (a.limit is None or a.limit > 100), "evaluates over 100 questions (minutes)"),
    (lambda a: a.command == "bench" and getattr(a, "arch", None) != "tiny", "times a real-size model (minutes)"),
]
DELEGATED = {
    "lmms-eval": "hands every argument to lmms-eval, an optional extra; only the subcommand is checked",
}
"""``tokensieve`` subcommands whose arguments belong to another program."""
SKIPPED = {
    ("pip",): "installs packages",
    ("python3", "-m", "venv"): "creates a virtual environment",
    ("python", "-m", "venv"): "creates a virtual environment",
    (".",): "activates a virtual environment",
    ("source",): "activates a virtual environment",
    ("python", "-m", "pytest"): "the test suite itself",
}


def _chains() -> list[list[list[str]]]:
    """Each README command line as a chain of argv lists (``a && b`` runs b after a)."""
    lines = []
    fenced = re.compile(r"```(bash|sh|shell|console)\n(.*?)```", re.S)
    for _, block in fenced.findall(README):
        pending = ""
        for ln in block.replace("\\\n", " ").splitlines():
            pending += ln
            try:
                shlex.split(pending)
            except ValueError:  # a quoted argument goes on over the next line
                pending += "\n"
                continue
            if pending.strip():
                lines.append(pending)
            pending = ""
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if re.match(r"(tokensieve|python3?) ", span):
            lines.append(span)
    chains = []
    for line in lines:
        tokens = shlex.split(line, comments=True)
        chain, current = [], []
        for tok in tokens:
            if tok == "&&":
                chain.append(current)
                current = []
            else:
                current.append(tok)
        chain.append(current)
        chains.append([c for c in chain if c])
    return chains


def normalize(argv: list[str]) -> list[str]:
    """``python -m tokensieve ...`` is ``tokensieve ...``."""
    if argv[:3] in (["python", "-m", "tokensieve"], ["python3", "-m", "tokensieve"]):
        return ["tokensieve"] + argv[3:]
    return argv


def classify(argv: list[str]) -> tuple[str, str]:
    """``("run" | "parse" | "mention" | "script" | "skip", why)`` for one command."""
    argv = normalize(argv)
    if argv[0] == "tokensieve":
        if len(argv) == 1:
            return "mention", "names the program in prose"
        if argv[1] in DELEGATED:
            return "mention", DELEGATED[argv[1]]
        if len(argv) == 2 and not argv[1].startswith("-"):
            return "mention", "names a subcommand in prose"
        if {"--help", "-h", "--version"} & set(argv):
            return "run", "prints help or the version"
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit:
            return "broken", "does not parse"
        for rule, why in PARSE_ONLY:
            if rule(args):
                return "parse", why
        if args.command in RUN:
            return "run", "finishes in seconds here"
        return "parse", f"{args.command!r} is not in the table of commands known to finish in seconds"
    for prefix, why in SKIPPED.items():
        if tuple(argv[: len(prefix)]) == prefix:
            return "skip", why
    if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
        return "script", "runs a script of the repository (minutes); its path is checked"
    return "skip", "not a tokensieve command"


CHAINS = _chains()
ALL = [cmd for chain in CHAINS for cmd in chain]


def _id(chain) -> str:
    return " && ".join(" ".join(c) for c in chain)[:90]


def test_the_readme_commands_are_found_and_classified():
    kinds = {}
    for cmd in ALL:
        kind, why = classify(cmd)
        assert why
        kinds.setdefault(kind, []).append(" ".join(cmd))
    assert "broken" not in kinds, kinds.get("broken")
    # the install line's demo, the reproduction commands and the training script are all seen
    assert "tokensieve run --method evocut --budget 64 --compare" in kinds["run"]
    assert any(c.startswith("tokensieve eval --data shapes --methods evocut,divprune") for c in kinds["parse"])
    assert any(c.startswith("python training/train_default.py") for c in kinds["script"])
    assert "pip install torch==2.13.0" in kinds["skip"]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A copy of the repository as a fresh clone has it (no git data, caches or virtual environments)."""
    dest = tmp_path_factory.mktemp("clone") / "tokensieve"
    shutil.copytree(
        ROOT,
        dest,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "venv*", "__pycache__", "*.egg-info", ".pytest_cache", "build", "dist"
        ),
    )
    return dest


@pytest.mark.parametrize("chain", [c for c in CHAINS if any(classify(cmd)[0] == "run" for cmd in c)], ids=_id)
def test_cheap_readme_commands_run_from_the_repository_root(chain, clone, monkeypatch, capsys):
    monkeypatch.chdir(clone)
    for cmd in map(normalize, chain):
        kind, _ = classify(cmd)
        if kind == "run":
            code = main(cmd[1:])
            assert code == 0, f"{' '.join(cmd)}: {capsys.readouterr().err[-2000:]}"


@pytest.mark.parametrize("cmd", [c for c in ALL if classify(c)[0] in ("parse", "mention")], ids=" ".join)
def test_other_readme_commands_parse(cmd):
    parser = build_parser()
    cmd = normalize(cmd)
    if classify(cmd)[0] == "mention":
        assert cmd[1:2] == [] or cmd[1] in parser._subparsers._group_actions[0].choices, f"no subcommand {cmd[1]!r}"
        return
    args = parser.parse_args(cmd[1:])
    image = getattr(args, "image", None)
    if image:  # files a command reads must ship with the repository
        path = (ROOT / image).resolve()
        assert path.is_relative_to(ROOT) and path.is_file(), f"--image {image} is not a file of the repository"
    if getattr(args, "methods", None) is not None and getattr(args, "budgets", None) is not None:
        from tokensieve.tools.configs import parse_configs

        # method names and budgets exist and match; eval fits adaptive thresholds itself
        parse_configs(args.methods, args.budgets, calibrates=cmd[1] == "eval")


@pytest.mark.parametrize("cmd", [c for c in ALL if classify(c)[0] == "script"], ids=" ".join)
def test_readme_scripts_exist(cmd):
    assert (ROOT / cmd[1]).is_file(), f"{cmd[1]} is named in the README but not in the repository"


def test_the_quick_start_with_the_embedded_model_runs(clone, monkeypatch, capsys):
    """Python blocks that load the embedded model themselves need nothing from outside: they run, and print what
    their comments say."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "load_default_model()" in b]
    assert blocks
    monkeypatch.chdir(clone)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
        printed = capsys.readouterr().out
        for expected in re.findall(r"print\(.*\)\s+# (\[.*\])", block):
            assert expected in printed
