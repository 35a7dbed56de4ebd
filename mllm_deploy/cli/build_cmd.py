"""`mllm-deploy build PROFILE [--out DIR] [--force]`: calibrate and compile everything up front."""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm_deploy.cli.common import add_profile_args, load_profile_from_args, print_diagnostics
from mllm_deploy.errors import ExitCode


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "build",
        help="calibrate, compile, audit and profile the NPU graphs (cached), optionally write a bundle",
        description="Calibrate activation clamps and outliers, build and audit every static-shape INT8 "
        "graph, compile QNN context binaries for qnn-htp targets and profile per-graph latency on the "
        "backend; the result is cached (keyed and locked) so later runs start warm. Exit 0 ok, 2 invalid, "
        "3 cannot run here.",
    )
    add_profile_args(parser, optional=True)
    parser.add_argument("--out", type=Path, metavar="DIR", help="also write a self-contained bundle to DIR")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache holds a valid entry")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from mllm_deploy.compile.build import compile_artifacts
    from mllm_deploy.compile.bundle import write_bundle
    from mllm_deploy.compile.calibration import render_calibration
    from mllm_deploy.resolve import resolve_profile

    started = time.perf_counter()
    loaded = load_profile_from_args(args)
    resolved = resolve_profile(loaded)
    print_diagnostics(w for w in resolved.warnings if w not in loaded.warnings)
    artifacts = compile_artifacts(resolved, force=args.force)
    lock = artifacts.lock
    print(f"artifacts: {artifacts.root}")
    print(f"backend: {resolved.backend_label}; chunk {lock.chunk_size}; target {lock.target}"
          + (f" (htp v{lock.htp_arch}, soc {lock.soc_model})" if lock.htp_arch else ""))  # fmt: skip
    print(render_calibration(artifacts.calibration), end="")
    lat = artifacts.latencies_ms
    print(f"graphs: {len(lat)}, profiled latency sum {sum(lat.values()):.1f} ms per chunk "
          f"(measured at build; noisy on a shared machine)")  # fmt: skip
    if args.out is not None:
        out = write_bundle(resolved, artifacts, args.out)
        print(f"bundle: {out}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return ExitCode.OK
