"""`mllm-deploy plan PROFILE [--json] [--dump-dir DIR] [--prompt-tokens N]`: how it will run."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from mllm_deploy.cli.common import add_opt_in_args, add_profile_args, load_profile_from_args, print_diagnostics
from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.plan import plan_to_json
from mllm_deploy.plan.render import render_plan


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
    add_opt_in_args(parser)  # says how the plan would run here with --emulate / --simulator
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_profile_from_args(args)
    deployment = Deployment.of(loaded, args.profile, args.overrides, opt_in=args.opt_in)
    resolved = deployment.resolved
    print_diagnostics(w for w in resolved.warnings if w not in loaded.warnings)
    limit = resolved.profile.prefill.max_context
    if args.prompt_tokens is not None and not 1 <= args.prompt_tokens <= limit:
        raise user_error(
            "--prompt-tokens out of range", value=args.prompt_tokens, allowed=f"1 to prefill.max_context ({limit})"
        )
    # deferred on purpose: finding built artifacts brings the compiler's modules (onnx)
    from mllm_deploy.interface.build import deployment_plan  # noqa: PLC0415

    view = deployment_plan(deployment, prompt_tokens=args.prompt_tokens, dump_dir=args.dump_dir)
    plan = view.plan
    here = deployment.here  # the plan is the target's; this says how it runs on this machine
    if args.json:
        data = json.loads(plan_to_json(plan))
        data["on_this_machine"] = {**asdict(here), "line": here.line}
        data["silu_mul_processor"] = "cpu" if resolved.silu_mul_on_cpu else "npu"  # gate_up's SiLU·mul
        sys.stdout.write(json.dumps(data, indent=1) + "\n")
        return ExitCode.OK
    sys.stdout.write(render_plan(plan, here=here.line, silu_mul_on_cpu=resolved.silu_mul_on_cpu))
    if view.calibration_report is not None:
        sys.stdout.write("\n" + view.calibration_report)
    else:
        sys.stdout.write(
            "\nnot built yet: shadowed inputs are provisional until `mllm-deploy build` calibrates\n"
            if resolved.backend != "none"
            else ""
        )
    return ExitCode.OK
