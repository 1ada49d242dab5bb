"""``tokensieve lmms-eval [--num_processes N] LMMS_EVAL_ARGS...``: lmms-eval, offline, with tokensieve's tasks.

What it adds to ``python -m lmms_eval``:

* ``--include_path`` of the packaged task folder (``tokensieve_easyvqa``, ``tokensieve_shapes``; tag
  ``tokensieve``), next to any ``--include_path`` you give;
* ``--model tokensieve`` when no ``--model`` is given;
* offline mode (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE`` set to 1 unless already
  set): the local tasks need no network, and without it ``datasets`` tries the hub once per run;
* a non-zero exit status when lmms-eval logged an error. lmms-eval catches an exception of the model or a task,
  logs it and exits 0, so a broken run would look like a finished one to a script or CI;
* ``--num_processes N`` (N > 1) re-runs this launcher under ``accelerate launch --multi_gpu --num_processes N``
  (data parallel, one model per process, lmms-eval's own sharding and gathering; on a machine without CUDA the
  processes form a gloo group on the CPU). ``accelerate launch ... -m tokensieve.lmms_eval ARGS`` works as well,
  with every ``accelerate`` option.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from . import TASKS_DIR

OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
INSTALL = (
    'pip install "tokensieve[lmms-eval]" && pip install --no-deps lmms-eval==0.7.3 '
    "(--no-deps keeps your torch build; lmms-eval's own list pulls a CUDA torch)"
)


class _ErrorCounter:
    """Counts ERROR and CRITICAL records of loguru, the logger lmms-eval uses.

    It is installed as loguru's *patcher*, not as a sink: lmms-eval removes every sink when it configures its own
    output, but a patcher sees each record that any sink would receive.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, record) -> None:
        if record["level"].no >= 40:
            self.errors.append(record["message"].splitlines()[0] if record["message"] else "")


def _split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours = argparse.ArgumentParser(prog="tokensieve lmms-eval", add_help=False)
    ours.add_argument("--num_processes", "--num-processes", type=int, default=1)
    ours.add_argument("--include_path", action="append", default=[])
    known, rest = ours.parse_known_args(argv)
    if known.num_processes < 1:
        raise SystemExit(f"tokensieve lmms-eval: --num_processes must be at least 1, got {known.num_processes}")
    return known, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        print("\nlmms-eval's own options follow (python -m lmms_eval --help).")
        return 0
    try:
        import lmms_eval  # noqa: F401
        import loguru  # noqa: F401
    except ImportError as exc:
        print(f"tokensieve lmms-eval: {exc}; install with {INSTALL}", file=sys.stderr)
        return 2
    for name in OFFLINE:
        os.environ.setdefault(name, "1")
    known, rest = _split_args(argv)
    if known.num_processes > 1:
        import torch

        env = dict(os.environ)
        if not torch.cuda.is_available():
            # accelerate's --cpu flag starts a single process unless MPI is set up; its multi-process launcher
            # (torchrun underneath) with ACCELERATE_USE_CPU gives one gloo process group over CPU processes
            env["ACCELERATE_USE_CPU"] = "true"
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(known.num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "tokensieve.lmms_eval",
        ]
        cmd += [f"--include_path={p}" for p in known.include_path] + rest
        return subprocess.call(cmd, env=env)
    return run(rest, known.include_path)


def _free_port() -> int:
    """A free local port for the process group, so two runs on one machine do not meet on accelerate's default."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: list[str], include_paths: list[str] = ()) -> int:
    """lmms-eval's command line in this process, with the task folder added; 1 if it logged an error."""
    from loguru import logger

    if not any(a == "--model" or a.startswith("--model=") for a in args):
        args = ["--model", "tokensieve"] + list(args)
    counter = _ErrorCounter()
    logger.configure(patcher=counter)
    from lmms_eval.__main__ import cli_evaluate

    sys.argv = ["lmms_eval"] + list(args)
    try:
        cli_evaluate(argparse.Namespace(include_path=[str(TASKS_DIR), *include_paths]))
    except SystemExit as exc:  # lmms-eval's own early exits (e.g. --tasks list)
        if exc.code not in (None, 0):
            return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # raised at --verbosity DEBUG instead of logged
        print(f"tokensieve lmms-eval: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if counter.errors:
        print(
            f"tokensieve lmms-eval: lmms-eval logged {len(counter.errors)} error(s); the first: {counter.errors[0]}",
            file=sys.stderr,
        )
        return 1
    return 0
