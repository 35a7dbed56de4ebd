"""Helpers shared by commands: profile arguments, loading, printing diagnostics."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from mllm_deploy.errors import Diagnostic


def add_profile_args(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """Positional PROFILE (a TOML file, or a bundle directory where accepted) and `--set`."""
    parser.add_argument(
        "profile",
        nargs="?" if optional else None,
        default=None,
        metavar="PROFILE",
        help="profile TOML file" + (" (default: the built-in default profile)" if optional else ""),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile key, e.g. --set prefill.chunk_size=128 (repeatable; validated exactly like the file)",
    )


def load_profile_from_args(args: argparse.Namespace):
    """The profile named by the arguments, with `--set` overrides; raises UserError."""
    from mllm_deploy.profile import load_profile

    loaded = load_profile(args.profile, args.overrides)
    print_diagnostics(loaded.warnings)
    return loaded


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of the commands that generate text (`run`, `chat`)."""
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="override decode.max_new_tokens")


def load_for_generation(args: argparse.Namespace):
    """(loaded profile, backend label) for `run`/`chat`: checks `--max-new-tokens`, loads the
    profile and refuses a backend this host cannot run; raises UserError."""
    from mllm_deploy.errors import user_error
    from mllm_deploy.runtime.availability import require_runnable_backend

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise user_error("--max-new-tokens must be at least 1", value=args.max_new_tokens)
    loaded = load_profile_from_args(args)
    return loaded, require_runnable_backend(loaded)


def open_chat_session(loaded):
    """A ChatSession on the profile's model (loads weights, compiles or reuses artifacts)."""
    from mllm_deploy.runtime.session import ChatSession, load_model

    return ChatSession(load_model(loaded), loaded)


def print_diagnostics(diagnostics: Iterable[Diagnostic]) -> None:
    for diag in diagnostics:
        print(diag.render(), file=sys.stderr)
