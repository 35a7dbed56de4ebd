"""`mllm-deploy plan PROFILE [--json] [--dump-dir DIR] [--prompt-tokens N]`: how it will run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_deploy.cli.common import add_profile_args, load_profile_from_args, print_diagnostics
from mllm_deploy.errors import ExitCode


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="resolve a profile against its device and model and print the execution plan",
        description="Validate the profile, check it against the target device and the model's "
        "metadata (nothing is compiled or loaded), and print the execution plan: static NPU graphs, "
        "every subgraph of one prefill with its processor, shapes and dtypes, the dependency DAG, "
        "memory per processor and a nominal time estimate. Exit 0 ok, 2 invalid, 3 cannot run here.",
    )
    add_profile_args(parser, optional=True)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    parser.add_argument(
        "--dump-dir", type=Path, metavar="DIR", help="write the plan after each pass to DIR/NN-pass.json"
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        metavar="N",
        help="prompt length to draw the prefill DAG for (default: 1024, or prefill.max_context if smaller)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.compile.build import find_artifacts
    from mllm_deploy.compile.calibration import render_calibration
    from mllm_deploy.errors import user_error
    from mllm_deploy.plan import build_plan, plan_to_json
    from mllm_deploy.plan.render import render_plan
    from mllm_deploy.resolve import resolve_profile

    loaded = load_profile_from_args(args)
    resolved = resolve_profile(loaded)
    print_diagnostics(w for w in resolved.warnings if w not in loaded.warnings)
    limit = resolved.profile.prefill.max_context
    if args.prompt_tokens is not None and not 1 <= args.prompt_tokens <= limit:
        raise user_error(
            "--prompt-tokens out of range", value=args.prompt_tokens, allowed=f"1 to prefill.max_context ({limit})"
        )
    # once `build` has calibrated this profile, the plan shows the shadowed inputs it measured
    artifacts = find_artifacts(resolved) if resolved.backend != "none" else None
    calibrated = tuple(artifacts.calibration.shadow_inputs) if artifacts is not None else None
    plan = build_plan(
        resolved, prompt_tokens=args.prompt_tokens, calibrated_shadow_inputs=calibrated, dump_dir=args.dump_dir
    )
    if args.json:
        sys.stdout.write(plan_to_json(plan))
        return ExitCode.OK
    sys.stdout.write(render_plan(plan))
    if artifacts is not None:
        sys.stdout.write("\n" + render_calibration(artifacts.calibration))
    else:
        sys.stdout.write(
            "\nnot built yet: shadowed inputs are provisional until `mllm-deploy build` calibrates\n"
            if resolved.backend != "none"
            else ""
        )
    return ExitCode.OK
