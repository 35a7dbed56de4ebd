"""`mllm-deploy estimate [PROFILE] [--model CARD|CONFIG.json ...] [--device ID ...]`: predicted TTFT,
prefill and decode speed, memory and bottleneck, before anything is built or held."""

from __future__ import annotations

import argparse
import sys

from mllm_deploy.cli.common import add_profile_args
from mllm_deploy.errors import ExitCode


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "estimate",
        help="predict TTFT, prefill/decode speed, memory and bottleneck on catalogued devices (no weights needed)",
        description="Predict how a profile runs on a device before building anything: the plan's prefill DAG "
        "for each prompt length, priced by the device's cost model (device catalog) and run through the "
        "runtime's own scheduler in simulated time. A model card (`mllm-deploy models cards`) is enough. "
        "On `host`, a built profile's measured graph latencies price the NPU graphs. Exit 0 ok, 2 invalid, "
        "3 the device has no cost model.",
    )
    add_profile_args(parser, optional=True)
    parser.add_argument(
        "--model", action="append", default=[], metavar="CARD|CONFIG.json",
        help="replace the profile's model: a card id (e.g. qwen1.5-1.8b), a Hugging Face config.json, or a "
        "model path (repeatable: models side by side)",
    )  # fmt: skip
    parser.add_argument(
        "--device", action="append", default=[], metavar="ID",
        help="replace the profile's device.target (repeatable: devices side by side)",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-tokens", type=_int_list, default=[64, 256, 1024, 4096], metavar="N[,N...]",
        help="prompt lengths (default 64,256,1024,4096)",
    )  # fmt: skip
    parser.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2",
        help="profile key and values to sweep (repeatable; the cartesian product is estimated)",
    )  # fmt: skip
    parser.add_argument(
        "--trace", metavar="FILE",
        help="write the predicted schedule as a Chrome trace (bench --trace's format); one file per row",
    )  # fmt: skip
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list of rows")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred on purpose: the estimate brings the plan, scheduler and (on host) the build's cache reader
    from mllm_deploy.estimate import EstimateRequest, estimate_rows  # noqa: PLC0415
    from mllm_deploy.estimate.render import rows_csv, rows_json, rows_table, trace_paths, write_trace  # noqa: PLC0415

    request = EstimateRequest(
        profile=args.profile,
        overrides=list(args.overrides),
        devices=list(args.device),
        models=list(args.model),
        prompt_tokens=list(args.prompt_tokens),
        sweeps=list(args.sweep),
    )
    estimated = estimate_rows(request)
    rows = [e.row for e in estimated]
    if args.trace:
        for e, path in zip(estimated, trace_paths(args.trace, estimated), strict=True):
            print(f"estimate: predicted trace written: {write_trace(e, path)}", file=sys.stderr)
    if args.json:
        sys.stdout.write(rows_json(rows))
    elif args.csv:
        sys.stdout.write(rows_csv(rows))
    else:
        sys.stdout.write(rows_table(rows))
    return ExitCode.OK
