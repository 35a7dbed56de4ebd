"""`mllm-deploy chat`: a plain line-based chat REPL (no TUI) that keeps the conversation and its
KV cache between turns. Works from a pipe: the `> ` prompt is printed only when stdin is a
terminal. `/reset` starts a new conversation, `/quit` (or end of input) leaves.

A turn that cannot run (the conversation outgrew `prefill.max_context` with `overflow =
"error"`) is reported and skipped; the exit code is then 2.
Ctrl-C during a reply stops it (the partial reply stays in the conversation); on a terminal
the REPL goes on, from a pipe it exits 130. Ctrl-C at the prompt exits 130.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mllm_deploy.cli.common import (
    add_generation_args,
    add_profile_args,
    deployment_for_generation,
    open_chat_session,
    print_diagnostics,
)
from mllm_deploy.errors import ExitCode, UserError
from mllm_deploy.events import TurnEvent
from mllm_deploy.interface.turns import Turn, run_turn
from mllm_deploy.runtime.report import metrics_line

if TYPE_CHECKING:  # the session module loads onnxruntime; a type is all the CLI needs of it
    from mllm_deploy.interface.session import ChatSession

HELP_TEXT = "commands: /reset (new conversation), /quit (leave), /help"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="line-based chat REPL without the UI (keeps the KV cache between turns)",
        description=__doc__.split("\n\n")[0],
    )
    add_profile_args(parser, optional=True)
    add_generation_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    deployment = deployment_for_generation(args)
    backend = deployment.backend
    interactive = sys.stdin.isatty()
    session = open_chat_session(deployment)
    if interactive:
        print(f"{session.model.spec.name} ({backend}); {HELP_TEXT}", file=sys.stderr)
    first_turn = True
    failed = False
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return ExitCode.INTERRUPTED
        if line is None:
            return ExitCode.INVALID if failed else ExitCode.OK
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return ExitCode.INVALID if failed else ExitCode.OK
        if text == "/reset":
            session.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        if text == "/help":
            print(HELP_TEXT, file=sys.stderr)
            continue
        try:
            done = run_turn(_turn(session, text, args.max_new_tokens), _write)
        except UserError as err:  # e.g. the conversation outgrew prefill.max_context
            print_diagnostics(err.diagnostics)
            print("[turn not run; /reset starts a new conversation]", file=sys.stderr, flush=True)
            failed = True
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        load_s = session.model.load_seconds if first_turn else None
        print(metrics_line(done, load_s=load_s, backend=backend), file=sys.stderr, flush=True)
        first_turn = False
        if done.finish_reason == "cancelled" and not interactive:
            return ExitCode.INTERRUPTED


def _turn(session: ChatSession, text: str, max_new_tokens: int | None) -> Turn:
    """One chat turn of `text`, bound now (the loop's variable changes before the turn runs)."""

    def turn(cancel: threading.Event) -> Iterator[TurnEvent]:
        return session.send(text, cancel=cancel, max_new_tokens=max_new_tokens)

    return turn


def _read_line(interactive: bool) -> str | None:
    """The next input line, or None at end of input."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line if line else None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
