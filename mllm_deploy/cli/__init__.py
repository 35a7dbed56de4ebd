"""`mllm-deploy` command line: parse arguments and call the pipeline; nothing else.

Each command lives in its own module exposing `register(subparsers)`, which adds a parser
whose `func` default is `run(args) -> int`. Diagnostics go to stderr, data to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from mllm_deploy import __version__
from mllm_deploy.cli import (
    bench_cmd,
    build_cmd,
    chat_cmd,
    devices_cmd,
    estimate_cmd,
    eval_cmd,
    init_cmd,
    models_cmd,
    plan_cmd,
    run_cmd,
    schema_cmd,
    serve_cmd,
    up_cmd,
    validate_cmd,
    verify_cmd,
)
from mllm_deploy.cli.common import add_verbosity_args, print_diagnostics, verbosity
from mllm_deploy.cli.progress import reporter_for
from mllm_deploy.errors import ExitCode, UserError
from mllm_deploy.events import reporting

# In `--help` order. The command modules keep their heavy imports (engines, onnxruntime, textual)
# inside `run`, so importing them all here keeps `--help` light (tests/test_tui_units.py checks
# that textual stays out).
COMMAND_MODULES = (
    validate_cmd,
    plan_cmd,
    schema_cmd,
    init_cmd,
    devices_cmd,
    models_cmd,
    run_cmd,
    chat_cmd,
    build_cmd,
    eval_cmd,
    verify_cmd,
    bench_cmd,
    estimate_cmd,
    up_cmd,
    serve_cmd,
)


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with a one-line usage error (its default), never a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mllm-deploy",
        description="Deploy small LLMs with chunked INT8 NPU prefill, shadow outliers and "
        "out-of-order NPU/CPU scheduling.",
    )
    parser.add_argument("--version", action="version", version=f"mllm-deploy {__version__}")
    add_verbosity_args(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    _add_verbosity_everywhere(sub)
    return parser


def _add_verbosity_everywhere(sub: argparse._SubParsersAction[Any]) -> None:
    """-v/-q on every command and on every action of a command with actions (`models install`)."""
    for command in set(sub.choices.values()):
        add_verbosity_args(command)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_verbosity_everywhere(action)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return ExitCode.INVALID
    reporter = reporter_for(args)  # progress of long steps: bars, JSON events or nothing
    try:
        try:
            with reporting(reporter):
                return int(args.func(args))
        finally:
            reporter.close()  # a terminal's bars stop before any message below
    except UserError as err:
        print_diagnostics(err.warnings + err.diagnostics)
        return int(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.OK
    except Exception as exc:
        if os.environ.get("MLLM_DEPLOY_DEBUG") or verbosity(args) > 0:
            traceback.print_exc()
        print(
            f"internal error: {type(exc).__name__}: {exc}\n"
            "    this is a bug in mllm-deploy; rerun with -v (or MLLM_DEPLOY_DEBUG=1) for a traceback",
            file=sys.stderr,
        )
        return ExitCode.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
