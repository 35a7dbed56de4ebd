"""`mllm-deploy up [PROFILE] [--set KEY=VALUE ...] [--resume NAME]`: the terminal UI.

The profile is loaded, resolved and planned before the UI opens, so an invalid profile or
one this device cannot run is reported like every other command (exit 2 / 3). The model then
loads inside the UI with a visible loading state. Ctrl+Q quits with exit code 0.
"""

from __future__ import annotations

import argparse
import sys

from mllm_deploy.cli.common import add_opt_in_args, add_profile_args, print_diagnostics
from mllm_deploy.errors import Diagnostic, ExitCode, user_error
from mllm_deploy.interface.deployment import load_deployment
from mllm_deploy.tui.sessions import load_session


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "up",
        help="open the terminal UI: chat and long-context prefill sessions with live NPU/CPU utilization",
        description=__doc__.split("\n\n")[0],
    )
    add_profile_args(parser, optional=True)
    parser.add_argument(
        "--resume",
        metavar="NAME",
        help="reopen a session saved with /save (its profile, overrides and --emulate/--simulator opt-in, "
        "then any --set given here)",
    )
    add_opt_in_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    saved = load_session(args.resume) if args.resume else None
    profile_arg = args.profile if args.profile is not None or saved is None else saved.profile
    overrides = [*(saved.overrides if saved else []), *args.overrides]
    opt_in = args.opt_in or (saved.opt_in if saved else None)  # an opt-in given here wins over the saved one
    deployment = load_deployment(profile_arg, overrides, opt_in=opt_in, to_run=True)
    print_diagnostics({d.render(): d for d in deployment.loaded.warnings + deployment.resolved.warnings}.values())
    print_diagnostics(Diagnostic(message=note, severity="warning") for note in deployment.here.notes)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise user_error(
            "`mllm-deploy up` needs a terminal",
            hint="from scripts use `mllm-deploy run` or `mllm-deploy chat`",
        )
    # deferred on purpose: textual (and the engines the app loads models with) load only when `up` opens
    # the TUI, so importing the CLI for any other command stays free of them
    from mllm_deploy.tui.app import DeployApp  # noqa: PLC0415

    app = DeployApp(deployment, resume=saved)
    app.run()
    return ExitCode.OK if app.return_code in (None, 0) else int(app.return_code)
