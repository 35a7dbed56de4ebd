"""`mllm-deploy schema`: the JSON Schema of profiles, on stdout."""

from __future__ import annotations

import argparse
import sys

from mllm_deploy.errors import ExitCode


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "schema",
        help="print the JSON Schema of profiles",
        description="Print the JSON Schema (draft 2020-12) of profile files to stdout. Editors with "
        "TOML schema support (taplo, Even Better TOML) complete and check keys with it; "
        "`mllm-deploy init` writes a `#:schema` line that points at the installed copy.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.profile.reference import schema_text

    sys.stdout.write(schema_text())
    return ExitCode.OK
