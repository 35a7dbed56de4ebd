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
        help="override a profile key, e.g. --set prefill.chunk_size=128 (repeatable; "
        "validated exactly like the file)",
    )


def load_profile_from_args(args: argparse.Namespace):
    """The profile named by the arguments, with `--set` overrides; raises UserError."""
    from mllm_deploy.profile import load_profile

    loaded = load_profile(args.profile, args.overrides)
    print_diagnostics(loaded.warnings)
    return loaded


def print_diagnostics(diagnostics: Iterable[Diagnostic]) -> None:
    for diag in diagnostics:
        print(diag.render(), file=sys.stderr)
