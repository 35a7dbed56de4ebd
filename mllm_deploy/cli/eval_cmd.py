"""`mllm-deploy eval PROFILE --text FILE [--max-tokens N] [--json]`: perplexity vs the float baseline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mllm_deploy.cli.common import add_opt_in_args, add_profile_args, deployment_to_run
from mllm_deploy.errors import ExitCode, user_error


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity of the profile's execution path and of the float baseline on a text file",
        description="Tokenize FILE, run chunked prefill with logits at every position through the "
        "profile's path (NPU graphs + shadow outliers) and through the float32 baseline, and print both "
        "perplexities and the share of activation values handled on the CPU.",
    )
    add_profile_args(parser, optional=True)
    parser.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to evaluate on")
    parser.add_argument(
        "--max-tokens", type=int, default=4096, metavar="N", help="evaluate the first N tokens (default 4096)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_opt_in_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred on purpose: evaluation brings onnxruntime and the engines
    from mllm_deploy.eval.report import evaluate_profile  # noqa: PLC0415

    if args.max_tokens < 2:
        raise user_error("--max-tokens must be at least 2", value=args.max_tokens)
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise user_error("text file not found", file=args.text) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise user_error(f"cannot read the text file: {exc}", file=args.text) from None
    deployment = deployment_to_run(args)
    report = evaluate_profile(deployment, text, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(report))
    else:
        ratio = report["perplexity"] / report["baseline_perplexity"]
        print(f"tokens:               {report['tokens']}")
        print(f"backend:              {report['backend']}")
        if "kv_cache" in report:
            print(
                f"KV cache:             {report['kv_cache']} ({100 * report['kv_saturated_fraction']:.4f}% of values saturated)"
            )
            print(f"prefill attention:    {report['attention']}")
        print(f"perplexity:           {report['perplexity']:.3f}  ({ratio:.4f}x float)")
        print(f"baseline (float32):   {report['baseline_perplexity']:.3f}")
        print(f"values on the CPU:    {100 * report['outlier_fraction']:.4f}% (shadow outliers)")
    return ExitCode.OK
