"""`mllm-deploy build PROFILE [--out DIR] [--force]`: calibrate and compile everything up front."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mllm_deploy.cli.common import add_profile_args, load_profile_from_args, print_diagnostics
from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.interface.deployment import Deployment


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "build",
        help="calibrate, compile, audit and profile the NPU graphs (cached), optionally write a bundle",
        description="Calibrate activation clamps and outliers, build and audit every static-shape INT8 "
        "graph, compile QNN context binaries for qnn-htp targets and profile per-graph latency on the "
        "backend; the result is cached (keyed and locked) so later runs start warm. With --out, the bundle's "
        "perplexity against the float32 model on a held-out text is measured and stored in its lockfile, "
        "and over [accuracy] max_ppl_ratio (default 1.05) nothing is written. Exit 0 ok, 2 invalid, "
        "3 cannot run here, 4 over the accuracy limit.",
    )
    add_profile_args(parser, optional=True)
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="also write a self-contained bundle to DIR (what a device runs)"
    )
    parser.add_argument(
        "--archive",
        action="store_true",
        help="with --out DIR: also write DIR.tar, one file to copy to the device (unpack it there with tar xf)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache holds a valid entry")
    parser.add_argument(
        "--force-accuracy",
        action="store_true",
        help="with --out DIR: write the bundle even when its accuracy is over [accuracy] max_ppl_ratio "
        "(its lockfile records that the gate was forced)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred on purpose: building brings onnxruntime and the calibration engine
    from mllm_deploy.interface.build import build_deployment  # noqa: PLC0415

    started = time.perf_counter()
    if args.archive and args.out is None:
        raise user_error("--archive needs --out DIR (the bundle it archives)")
    if args.force_accuracy and args.out is None:
        raise user_error("--force-accuracy needs --out DIR (the accuracy gate applies to bundles only)")
    loaded = load_profile_from_args(args)
    deployment = Deployment.of(loaded, args.profile, args.overrides)
    print_diagnostics(w for w in deployment.resolved.warnings if w not in loaded.warnings)
    built = build_deployment(
        deployment, force=args.force, out=args.out, archive=args.archive, force_accuracy=args.force_accuracy
    )
    print(built.report, end="")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return ExitCode.OK
