"""Every command in the README and in ``docs/*.md``, from the root of a fresh copy of the repository.

Commands come from fenced ``bash`` blocks and from inline code spans that start with ``tokensieve `` or ``python ``,
in README.md and in every page under ``docs/`` alike (their commands are written to run from the repository root).
A ``tokensieve`` command that finishes in seconds on the tiny or default model runs for real (in-process); any other
``tokensieve`` command is parsed, its method names and budgets checked, and not run; other programs are skipped with
the reason, except that ``python some/script.py`` must name a file in the repository. The tables below decide, so a
command added later lands somewhere sensible by default: an unknown ``tokensieve`` subcommand (a serving or
lmms-eval launcher) is parsed only, an unknown program (``vllm``, ``lmms-eval``, ``accelerate``) is skipped.
Models outside the repository are written ``path/to/...`` in the README and the docs.

Beyond running what they say, the documents are held to a few rules: no command names a path, lock file or machine
that a user does not have; every output a command writes goes under a folder git ignores (or into the committed
``benchmarks/results/`` that the reproduce commands regenerate); the README stays short; and every relative link
(and anchor) points at something that exists.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from tokensieve.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = {
    p.relative_to(ROOT).as_posix(): p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
}
"""README.md and every ``docs/*.md`` page, by path relative to the repository root."""
README = DOCS["README.md"]
README_MAX_LINES = 250

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


def _chains(text: str) -> list[list[list[str]]]:
    """Each command line of one document as a chain of argv lists (``a && b`` runs b after a)."""
    lines = []
    fenced = re.compile(r"```(bash|sh|shell|console)\n(.*?)```", re.S)
    for _, block in fenced.findall(text):
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
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
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
        chain = [c for c in chain if c]
        if chain:  # a line that is only a comment is no command
            chains.append(chain)
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


CHAINS = [(doc, chain) for doc, text in DOCS.items() for chain in _chains(text)]
"""``(document, chain)`` for every command line of every document."""
ALL = [(doc, cmd) for doc, chain in CHAINS for cmd in chain]


def _id(item) -> str:
    doc, chain = item
    return f"{doc}: " + " && ".join(" ".join(c) for c in chain)[:90]


def _cmd_id(item) -> str:
    doc, cmd = item
    return f"{doc}: " + " ".join(cmd)[:90]


def test_the_readme_commands_are_found_and_classified():
    kinds, readme_kinds = {}, {}
    for doc, cmd in ALL:
        kind, why = classify(cmd)
        assert why
        kinds.setdefault(kind, []).append(" ".join(cmd))
        if doc == "README.md":
            readme_kinds.setdefault(kind, []).append(" ".join(cmd))
    assert "broken" not in kinds, kinds.get("broken")
    # the README's set-up commands: the install line's demo runs, and the test command is the one CI runs
    assert "tokensieve run --method evocut --budget 64 --compare" in readme_kinds["run"]
    assert "pip install torch==2.13.0" in readme_kinds["skip"]
    assert ("README.md", [[".", ".venv/bin/activate"], ["python", "-m", "pytest"]]) in CHAINS
    # the reproduction commands and the training script, wherever they now live, are all seen
    assert any(c.startswith("tokensieve eval --data shapes --methods evocut,divprune") for c in kinds["parse"])
    assert any(c.startswith("python training/train_default.py") for c in kinds["script"])
    assert any(c.startswith("python benchmarks/") for c in kinds["script"])
    # every docs page with commands has them found (a page whose fences are not bash would silently test nothing)
    for doc in (
        "docs/measuring.md",
        "docs/default-models.md",
        "docs/adaptive.md",
        "docs/lmms-eval.md",
        "docs/vllm.md",
        "docs/benchmarks.md",
    ):
        assert any(d == doc for d, _ in CHAINS), f"no command found in {doc}"


def test_the_first_set_up_command_offers_cpu_only_torch_first():
    """Users who want CPU-only torch read how before the install line, not after it."""
    first = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    cpu = first.find("--index-url https://download.pytorch.org/whl/cpu")
    install = first.find("pip install torch==2.13.0 && ")
    assert 0 <= cpu < install, "the CPU-only torch choice must come first in the first set-up command"
    assert first.startswith("#"), "the CPU-only choice is the first line of the first set-up command"


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A copy of the repository as a fresh clone has it (no git data, caches or virtual environments)."""
    dest = tmp_path_factory.mktemp("clone") / "tokensieve"
    patterns = shutil.ignore_patterns(
        ".git", ".venv*", "venv*", "__pycache__", "*.egg-info", ".pytest_cache", "build", "dist"
    )

    def ignore(folder, names):  # also the commands' own output folder, which a fresh clone does not have
        return set(patterns(folder, names)) | ({"out"} if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.mark.parametrize("item", [(d, c) for d, c in CHAINS if any(classify(cmd)[0] == "run" for cmd in c)], ids=_id)
def test_cheap_readme_commands_run_from_the_repository_root(item, clone, monkeypatch, capsys):
    _, chain = item
    monkeypatch.chdir(clone)
    for cmd in map(normalize, chain):
        kind, _ = classify(cmd)
        if kind == "run":
            code = main(cmd[1:])
            assert code == 0, f"{' '.join(cmd)}: {capsys.readouterr().err[-2000:]}"


@pytest.mark.parametrize("item", [(d, c) for d, c in ALL if classify(c)[0] in ("parse", "mention")], ids=_cmd_id)
def test_other_readme_commands_parse(item):
    _, cmd = item
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


@pytest.mark.parametrize("item", [(d, c) for d, c in ALL if classify(c)[0] == "script"], ids=_cmd_id)
def test_readme_scripts_exist(item):
    doc, cmd = item
    assert (ROOT / cmd[1]).is_file(), f"{cmd[1]} is named in {doc} but not in the repository"


def test_the_quick_start_with_the_embedded_model_runs(clone, monkeypatch, capsys):
    """Python blocks that load the embedded model themselves need nothing from outside: they run, and print what
    their comments say. The README's quick start has one; a docs page may add more."""
    blocks = [
        (doc, b)
        for doc, text in DOCS.items()
        for b in re.findall(r"```python\n(.*?)```", text, re.S)
        if "load_default_model()" in b
    ]
    assert any(doc == "README.md" for doc, _ in blocks)
    monkeypatch.chdir(clone)
    for doc, block in blocks:
        exec(compile(block, doc, "exec"), {})
        printed = capsys.readouterr().out
        for expected in re.findall(r"print\(.*\)\s+# (\[.*\])", block):
            assert expected in printed


# -- rules for every document --------------------------------------------------------------------------------------


def test_the_readme_is_short():
    """The README is the front page: set-up, quick start, the two tables and links; the rest lives in docs/."""
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"
    )


MACHINE_ONLY = {
    r"\bflock\b": "a lock wrapper of the machine the numbers were taken on (say: run on an otherwise idle machine)",
    r"/tmp/": "a scratch folder of one machine (write under out/ instead)",
    r"/work/": "a folder of the project's own machines",
    r"[\w./-]+\.lock\b": "a lock file",
}
"""What no command in a document may name: users do not have these."""


def _code(text: str) -> str:
    """Every fenced block and inline code span of a markdown text, where commands and paths are written."""
    fenced = re.findall(r"```.*?```", text, re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return "\n".join(fenced + re.findall(r"`([^`]+)`", prose))


def _model_cards() -> dict[str, str]:
    """The embedded models' cards, wherever the package keeps the model folders; commands there are indented."""
    cards = sorted((ROOT / "src" / "tokensieve").rglob("default_model*/README.md"))
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in cards}


def test_no_command_names_a_machine_path_or_a_lock():
    cards = _model_cards()
    assert cards, "no model card found under src/tokensieve"
    found = []
    for doc, code in [*((d, _code(t)) for d, t in DOCS.items()), *cards.items()]:
        for pattern, what in MACHINE_ONLY.items():
            for hit in re.finditer(pattern, code):
                line = code[code.rfind("\n", 0, hit.start()) + 1 : code.find("\n", hit.end())]
                found.append(f"{doc}: {hit.group(0)!r} ({what}) in: {line.strip()[:120]}")
    assert not found, "\n".join(found)


OUTPUT_OPTIONS = ("--out", "--output_path", "--output-path", "--state-dir", "--checkpoint-dir", "--logs")
"""Options through which the documented commands write files or folders."""
IGNORED_PREFIXES = ("out/",)
"""Output folders git ignores (each must be in .gitignore); documented commands write their outputs here."""
COMMITTED_PREFIXES = ("benchmarks/results/",)
"""The committed results: the reproduce commands next to each table regenerate them in place, on purpose."""
WRITES_BY_DEFAULT = {"bench": "bench-results", "show": "show.png"}
"""``tokensieve`` subcommands that write into the repository root unless given ``--out``."""


def _outputs(argv: list[str]) -> list[str]:
    """The paths one command writes to (empty when it writes nothing)."""
    argv = normalize(argv)
    paths = []
    for i, tok in enumerate(argv):
        for option in OUTPUT_OPTIONS:
            if tok == option and i + 1 < len(argv):
                paths.append(argv[i + 1])
            elif tok.startswith(option + "="):
                paths.append(tok.split("=", 1)[1])
    if argv[:2] == ["tokensieve", "make-tiny"] and len(argv) > 2:
        paths.append(argv[2])
    return paths


def test_the_output_folders_are_ignored_by_git():
    entries = {
        ln.strip().strip("/")
        for ln in (ROOT / ".gitignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    for prefix in IGNORED_PREFIXES:
        assert prefix.strip("/") in entries, f".gitignore does not ignore {prefix}"


@pytest.mark.parametrize(
    "item",
    [
        (d, c)
        for d, c in ALL
        if _outputs(c)
        or (normalize(c)[0] == "tokensieve" and len(normalize(c)) > 2 and normalize(c)[1] in WRITES_BY_DEFAULT)
    ],
    ids=_cmd_id,
)
def test_documented_commands_write_only_to_ignored_or_results_folders(item):
    doc, cmd = item
    argv = normalize(cmd)
    if argv[0] == "tokensieve" and argv[1] in WRITES_BY_DEFAULT:
        assert "--out" in argv or any(a.startswith("--out=") for a in argv), (
            f"{doc}: {' '.join(cmd)} writes {WRITES_BY_DEFAULT[argv[1]]} into the repository; give --out out/..."
        )
    for path in _outputs(cmd):
        path = path.removeprefix("./")
        assert path.startswith(IGNORED_PREFIXES + COMMITTED_PREFIXES), (
            f"{doc}: {' '.join(cmd)} writes to {path!r}, outside the ignored {IGNORED_PREFIXES} and the committed "
            f"{COMMITTED_PREFIXES}; a reproduce command must never overwrite what the repository ships"
        )


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(text: str) -> list[str]:
    """The targets of every markdown link and image outside code."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"`[^`]*`", "", prose)
    return LINK.findall(prose)


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _relative_links():
    for doc, text in DOCS.items():
        for target in _links(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
                continue
            yield doc, target


def test_relative_links_point_to_existing_files():
    """Links into the source tree only where the path exists (moved source files are named in code spans instead)."""
    missing = []
    for doc, target in _relative_links():
        path = target.split("#", 1)[0]
        if not path:
            continue
        resolved = ((ROOT / doc).parent / path).resolve()
        if not (resolved.is_relative_to(ROOT) and resolved.exists()):
            missing.append(f"{doc}: {target}")
    assert not missing, "links to nothing:\n" + "\n".join(missing)


def test_link_anchors_exist():
    missing = []
    for doc, target in _relative_links():
        path, _, anchor = target.partition("#")
        if not anchor:
            continue
        file = ((ROOT / doc).parent / path).resolve() if path else ROOT / doc
        if file.suffix == ".md" and file.is_file() and anchor not in _anchors(file.read_text()):
            missing.append(f"{doc}: {target}")
    assert not missing, "anchors that no heading makes:\n" + "\n".join(missing)


def test_every_docs_page_is_linked_from_the_index_and_long_pages_open_with_contents():
    index = DOCS["docs/README.md"]
    for doc, text in DOCS.items():
        if not doc.startswith("docs/") or doc == "docs/README.md":
            continue
        name = doc.removeprefix("docs/")
        assert f"]({name})" in index, f"docs/README.md does not link {name}"
        if len(text.splitlines()) > 80:  # a long page starts with links to its own sections
            head = "\n".join(text.splitlines()[:30])
            assert len(re.findall(r"\]\(#[^)]+\)", head)) >= 3, f"{doc} has no table of contents at its top"
