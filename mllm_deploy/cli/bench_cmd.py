"""`mllm-deploy bench PROFILE`: measured prefill/decode speed, memory and utilization over sweeps.

Each configuration (the cartesian product of `--sweep` values) runs in a fresh process, so its
peak RSS is its own. Rows go to stdout (table, `--json`, `--jsonl` or `--csv`); progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from mllm_deploy.bench.runner import BenchRequest, check_configs, expand_sweeps, render_csv, render_table, run_bench
from mllm_deploy.cli.common import add_opt_in_args, add_profile_args
from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.events import report_note as note
from mllm_deploy.events import report_progress


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure prefill/decode speed, memory and utilization",
                                   description=__doc__.split("\n\n")[0])  # fmt: skip
    add_profile_args(parser, optional=True)
    parser.add_argument("--prompt-tokens", type=_int_list, default=[256, 1024], metavar="N[,N...]",
                        help="prompt lengths in tokens of real text (default 256,1024)")  # fmt: skip
    parser.add_argument("--gen-tokens", type=int, default=32, metavar="N", help="tokens to decode per run (default 32)")
    parser.add_argument(
        "--repeat", type=int, default=3, metavar="R", help="measured runs per prompt length (default 3)"
    )
    parser.add_argument("--warmup", type=int, default=1, metavar="W", help="unmeasured runs first (default 1)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="profile key and values to sweep (repeatable; the cartesian product runs)")  # fmt: skip
    parser.add_argument("--trace", metavar="FILE", help="write a Chrome trace of the last run (per configuration)")
    add_opt_in_args(parser)
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON list of rows")
    out.add_argument("--jsonl", action="store_true", help="print one JSON row per line as configurations finish")
    out.add_argument("--csv", action="store_true", help="print CSV")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.gen_tokens < 1 or args.repeat < 1 or args.warmup < 0:
        raise user_error("--gen-tokens and --repeat must be >= 1, --warmup >= 0",
                         value=f"{args.gen_tokens}, {args.repeat}, {args.warmup}")  # fmt: skip
    request = BenchRequest(args.profile, list(args.overrides), args.prompt_tokens, args.gen_tokens,
                           args.repeat, args.warmup, args.trace, args.opt_in)  # fmt: skip
    configs = expand_sweeps(args.sweep)
    check_configs(request, configs)

    stage = f"bench: {len(configs)} configuration(s), each in its own process"
    finished = 0
    report_progress(stage, 0, len(configs))

    def progress(rows: list[dict]) -> None:
        nonlocal finished
        for row in rows:
            note(f"bench: {row['settings'] or 'default'} prompt {row['prompt_tokens']}: "
                 f"prefill {row['prefill_tokens_per_s']} tok/s, decode {row['decode_tokens_per_s']} tok/s")  # fmt: skip
            if args.jsonl:
                print(json.dumps(row), flush=True)
        finished += 1
        report_progress(stage, finished, len(configs))

    rows = run_bench(request, configs, on_rows=progress)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.csv:
        sys.stdout.write(render_csv(rows))
    elif not args.jsonl:
        sys.stdout.write(render_table(rows))
    return ExitCode.OK
