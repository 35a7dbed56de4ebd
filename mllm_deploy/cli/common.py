"""Helpers shared by commands: profile arguments, loading, printing diagnostics."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from mllm_deploy.errors import Diagnostic, user_error
from mllm_deploy.interface.deployment import Deployment, load_deployment_profile
from mllm_deploy.profile import LoadedProfile

if TYPE_CHECKING:
    from mllm_deploy.interface.session import ChatSession


def add_verbosity_args(parser: argparse.ArgumentParser) -> None:
    """`-v/--verbose` and `-q/--quiet`, which every command takes (`build_parser` adds them to each
    command's parser and its sub-actions; a new command gets them without asking). Defaults are
    suppressed so that a sub-parser never overwrites what the parent parsed: read them with
    `verbosity(args)`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="say more on stderr: each long step's time when it ends, and a traceback on an internal error",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress and no informational lines on stderr (warnings and errors still print)",
    )


def verbosity(args: argparse.Namespace) -> int:
    """-1 with `--quiet`, 0 by default, 1 (or more) with `-v` (`-vv`)."""
    if getattr(args, "quiet", False):
        return -1
    return int(getattr(args, "verbose", 0) or 0)


def add_profile_args(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """Positional PROFILE (a TOML file, or a bundle directory where accepted) and `--set`."""
    parser.add_argument(
        "profile",
        nargs="?" if optional else None,
        default=None,
        metavar="PROFILE",
        help="profile TOML file, or a bundle directory written by `build --out`"
        + (" (default: the built-in default profile)" if optional else ""),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile key, e.g. --set prefill.chunk_size=128 (repeatable; validated exactly like the file)",
    )


def add_opt_in_args(parser: argparse.ArgumentParser) -> None:
    """`--emulate` / `--simulator`: how a Hexagon (qnn-htp) profile or bundle may run on a machine
    without a Hexagon NPU (refused otherwise, exit 3). Commands that run a model take them."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--emulate",
        dest="opt_in",
        action="store_const",
        const="emulate",
        help="run a Hexagon target's QDQ graphs on onnxruntime's CPU integer kernels here "
        "(every output is labelled emulation: the phone's graphs, not the phone's speed)",
    )
    group.add_argument(
        "--simulator",
        dest="opt_in",
        action="store_const",
        const="simulator",
        help="run a Hexagon target's context binaries on Qualcomm's x86 HTP simulator "
        "(labelled; 200-700x slower than the CPU: for verification)",
    )
    parser.set_defaults(opt_in=None)


def load_profile_from_args(args: argparse.Namespace) -> LoadedProfile:
    """The profile named by the arguments, with `--set` overrides; raises UserError."""
    opt_in = getattr(args, "opt_in", None)  # only commands that run a model take --emulate / --simulator
    loaded = load_deployment_profile(args.profile, args.overrides, opt_in=opt_in)  # a bundle is verified first
    print_diagnostics(loaded.warnings)
    return loaded


def deployment_to_run(args: argparse.Namespace) -> Deployment:
    """The deployment a command runs here (run, chat, bench, eval): loaded, resolved, and refused
    (exit 3) when this machine cannot run it without `--emulate` / `--simulator`; the notes of how
    it runs here (a slow simulator, an opt-in without effect) go to stderr."""
    deployment = Deployment.of(
        load_profile_from_args(args), args.profile, args.overrides, opt_in=args.opt_in, to_run=True
    )
    print_diagnostics(Diagnostic(message=note, severity="warning") for note in deployment.here.notes)
    return deployment


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of the commands that generate text (`run`, `chat`)."""
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="override decode.max_new_tokens")
    add_opt_in_args(parser)


def deployment_for_generation(args: argparse.Namespace) -> Deployment:
    """The deployment `run`/`chat` generate with: checks `--max-new-tokens`, loads the profile and
    resolves it (once), refusing what this host cannot run; raises UserError."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise user_error("--max-new-tokens must be at least 1", value=args.max_new_tokens)
    return deployment_to_run(args)


def open_chat_session(deployment: Deployment) -> ChatSession:
    """A ChatSession on the deployment's model (loads weights; obtains or reuses artifacts)."""
    # deferred on purpose: the engines bring onnxruntime, which only generating commands need
    from mllm_deploy.interface.session import ChatSession, load_model  # noqa: PLC0415

    return ChatSession(load_model(deployment), deployment.loaded)


def print_diagnostics(diagnostics: Iterable[Diagnostic]) -> None:
    for diag in diagnostics:
        print(diag.render(), file=sys.stderr)


def read_text_file(name: str, what: str) -> str:
    """The UTF-8 text of the file `name` (`-`: standard input) that a command argument names; a
    located UserError (exit 2) naming it as `what` ("prompt file", "text file") when it is
    missing or unreadable."""
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise user_error(f"{what} not found", file=name) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise user_error(f"cannot read the {what}: {exc}", file=name) from None
