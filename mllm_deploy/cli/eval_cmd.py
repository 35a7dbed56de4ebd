"""`mllm-deploy eval PROFILE --text FILE [--max-tokens N] [--json]`: perplexity vs the float baseline."""

from __future__ import annotations

import argparse
import json

from mllm_deploy.cli.common import add_opt_in_args, add_profile_args, deployment_to_run, read_text_file
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
    parser.add_argument(
        "--reference",
        metavar="MODEL",
        help="for a bundle: the model it was built from (path or builtin:NAME), for the float32 baseline; "
        "default: an installed built-in model of the same identity, else no baseline (the bundle's "
        "build-time accuracy is shown instead)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_opt_in_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred on purpose: evaluation brings onnxruntime and the engines
    from mllm_deploy.eval.report import evaluate_profile  # noqa: PLC0415

    if args.max_tokens < 2:
        raise user_error("--max-tokens must be at least 2", value=args.max_tokens)
    text = read_text_file(args.text, "text file")
    deployment = deployment_to_run(args)
    report = evaluate_profile(deployment, text, max_tokens=args.max_tokens, reference=args.reference)
    print(json.dumps(report) if args.json else report_text(report))
    return ExitCode.OK


def report_text(report: dict) -> str:
    """The report as aligned lines; the ratio to float when there is a baseline, else (a bundle
    whose original model is not here) the bundle's build-time accuracy."""
    lines = [f"tokens:               {report['tokens']}", f"backend:              {report['backend']}"]
    if "kv_cache" in report:
        saturated = 100 * report["kv_saturated_fraction"]
        lines.append(f"KV cache:             {report['kv_cache']} ({saturated:.4f}% of values saturated)")
        lines.append(f"prefill attention:    {report['attention']}")
    baseline = report["baseline_perplexity"]
    if baseline is not None:
        ratio = report["perplexity"] / baseline
        lines.append(f"perplexity:           {report['perplexity']:.3f}  ({ratio:.4f}x float)")
        lines.append(f"baseline (float32):   {baseline:.3f}")
    else:
        built = report.get("bundle_accuracy")
        at_build = (
            f"{built['ppl_ratio']:.4f}x float on {built['tokens']} tokens of {built['text']}"
            if built
            else "not measured"
        )
        lines.append(f"perplexity:           {report['perplexity']:.3f}")
        lines.append("baseline (float32):   none (the bundle's model is trimmed and the original is not "
                     "on this machine: --reference MODEL)")  # fmt: skip
        lines.append(f"accuracy at build:    {at_build}")
    lines.append(f"values on the CPU:    {100 * report['outlier_fraction']:.4f}% (shadow outliers)")
    return "\n".join(lines)
