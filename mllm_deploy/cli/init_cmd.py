"""`mllm-deploy init PATH [--template NAME] [--force]`: write a new profile from a template."""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm_deploy.errors import Diagnostic, ExitCode, UserError
from mllm_deploy.paths import atomic_write_text, resource_dir
from mllm_deploy.profile import load_profile_text
from mllm_deploy.profile.reference import SCHEMA_PATH
from mllm_deploy.profile.suggest import did_you_mean

DEFAULT_TEMPLATE = "default"
SCHEMA_DIRECTIVE = "#:schema"


def templates_dir() -> Path:
    return resource_dir("templates") / "profiles"


def template_names() -> list[str]:
    """Names of the profile templates shipped with the package."""
    folder = templates_dir()
    return sorted(path.stem for path in folder.glob("*.toml")) if folder.is_dir() else []


def schema_header() -> str:
    """The `#:schema` line pointing editors at the installed JSON Schema, as a file URI."""
    return f"{SCHEMA_DIRECTIVE} {SCHEMA_PATH.resolve().as_uri()}"


def render_template(name: str) -> str:
    """The text `init` writes for template `name`: the schema header, then the template."""
    names = template_names()
    if name not in names:
        raise UserError(
            [
                Diagnostic(
                    message=f"unknown template {name!r}",
                    key="--template",
                    allowed=", ".join(names),
                    hint=did_you_mean(name, names),
                )
            ]
        )
    body = (templates_dir() / f"{name}.toml").read_text(encoding="utf-8")
    lines = [line for line in body.splitlines() if not line.startswith(SCHEMA_DIRECTIVE)]
    return "\n".join([schema_header(), *lines]) + "\n"


def register(subparsers: argparse._SubParsersAction) -> None:
    names = template_names()
    parser = subparsers.add_parser(
        "init",
        help="write a new profile from a template",
        description="Write a commented profile to PATH from a template. Its first line, `#:schema ...`, "
        "lets editors complete and check keys. Templates: " + ", ".join(names) + ".",
    )
    parser.add_argument("path", metavar="PATH", help="where to write the profile (e.g. my-profile.toml)")
    parser.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        metavar="NAME",
        help=f"template to start from: {', '.join(names)} (default: {DEFAULT_TEMPLATE})",
    )
    parser.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    target = Path(args.path)
    text = render_template(args.template)
    if target.is_dir():
        raise UserError(
            [Diagnostic(message="is a directory; give the path of the profile file to write", file=str(target))]
        )
    if target.exists() and not args.force:
        raise UserError(
            [
                Diagnostic(
                    message="already exists; not overwriting it", file=str(target), hint="pass --force to overwrite it"
                )
            ]
        )
    load_profile_text(text, file=target)  # a template that does not validate is a bug: exit 1
    try:
        atomic_write_text(target, text)
    except OSError as exc:
        raise UserError(
            [Diagnostic(message=f"cannot write the profile: {exc.strerror or exc}", file=str(target))]
        ) from None
    print(f"wrote {target} from template {args.template!r}; check it with: mllm-deploy validate {target}")
    return ExitCode.OK
