"""`mllm-deploy schema [profile|batch-request|batch-result]`: a JSON Schema, on stdout."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mllm_deploy.errors import ExitCode
from mllm_deploy.interface.batch import request_schema_text, result_schema_text
from mllm_deploy.profile.reference import schema_text

# What each schema describes, and the function that generates it (its committed copy is the same text).
SCHEMAS: dict[str, tuple[str, Callable[[], str]]] = {
    "profile": ("profile files (TOML)", schema_text),
    "batch-request": ("one request line of `run --batch FILE.jsonl`", request_schema_text),
    "batch-result": ("one output line of `run --batch`: a result or an error", result_schema_text),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "schema",
        help="print the JSON Schema of profiles (or of batch requests and results)",
        description="Print a JSON Schema (draft 2020-12) to stdout, by default that of profile files. "
        "Editors with TOML schema support (taplo, Even Better TOML) complete and check profile keys "
        "with it; `mllm-deploy init` writes a `#:schema` line that points at the installed copy.",
    )
    parser.add_argument(
        "which",
        nargs="?",
        default="profile",
        choices=list(SCHEMAS),
        help="; ".join(f"{name}: {what}" for name, (what, _) in SCHEMAS.items()) + " (default: profile)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(SCHEMAS[args.which][1]())
    return ExitCode.OK
