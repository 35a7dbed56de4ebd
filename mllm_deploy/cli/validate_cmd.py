"""`mllm-deploy validate PROFILE [--set KEY=VALUE]`: is this profile well formed?"""

from __future__ import annotations

import argparse

from mllm_deploy.cli.common import add_profile_args, load_profile_from_args, print_diagnostics
from mllm_deploy.errors import ExitCode
from mllm_deploy.profile import LoadedProfile
from mllm_deploy.profile.source import printable
from mllm_deploy.resolve import resolve_profile


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a profile and report every problem with its file:line:col",
        description="Check a profile: every key, type, value and range, with --set overrides applied; then "
        "check it against the target device and the model's metadata (dtypes, chunk size, context, "
        "memory, threads, placement). "
        "Problems go to stderr as file:line:col with the key, the value, what is allowed and a "
        "'did you mean'. Exit 0 when valid (warnings do not fail), 2 when invalid, 3 when it cannot run on the device.",
    )
    add_profile_args(parser)
    parser.set_defaults(func=run)


def validate_profile_shape(args: argparse.Namespace) -> LoadedProfile:
    """The profile part of `validate`: load, validate and print warnings; raises UserError (exit 2)."""
    return load_profile_from_args(args)


def ok_line(loaded: LoadedProfile, shown_path: str) -> str:
    """`PROFILE: ok (name 'x')`, plus the number of warnings when there are any."""
    line = f"{shown_path}: ok (name {loaded.profile.name!r})"
    count = len(loaded.warnings)
    if count:
        line += f"; {count} warning{'s' if count != 1 else ''}"
    return line


def run(args: argparse.Namespace) -> int:
    loaded = validate_profile_shape(args)
    resolved = resolve_profile(loaded)  # second pass: the device and the model (exit 3 if it cannot run)
    print_diagnostics(w for w in resolved.warnings if w not in loaded.warnings)
    shown = args.profile if args.profile is not None else str(loaded.path)
    print(ok_line(loaded, printable(shown)))
    print(f"  runs on {resolved.caps.id} with npu backend {resolved.backend_label}; model {resolved.spec.name}")
    return ExitCode.OK
