"""`mllm-deploy verify BUNDLE [--chunks N] [--layers SPEC] [--backend B] [--text FILE] [--json]`: run a bundle's
graphs on every backend this machine has against the float32 model."""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm_deploy.cli.common import print_diagnostics, read_text_file
from mllm_deploy.errors import ExitCode


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="run a bundle's graphs on every backend here (CPU provider, QNN HTP simulator) against float32",
        description="Open BUNDLE (refused as `run` refuses it; a qnn-htp bundle is allowed on Qualcomm's x86 "
        "HTP simulator) and run its graphs for N chunks of the held-out text through every layer of its model, "
        "on onnxruntime's CPU provider and, where onnxruntime-qnn offers it, on QNN HTP (its context binaries). "
        "Reports, per backend, the perplexity ratio, top-1 agreement and logit cosine against the float32 "
        "model, per-layer hidden-state and per-graph agreement, and the graphs QNN refused. The simulator is "
        "200-700x slower than the CPU: ~2 min per 256-token chunk through 30 layers (see docs/deploy.md); "
        "--layers runs a subset per run. Exit 0 ok, 2 invalid, 3 cannot run here.",
    )
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="a bundle directory (build PROFILE --out DIR)")
    parser.add_argument(
        "--chunks", type=int, default=1, metavar="N", help="prompt chunks of the bundle's chunk size (default 1)"
    )
    parser.add_argument(
        "--layers",
        metavar="SPEC",
        help="layers whose graphs run (others: float linears), e.g. 0-9 or 0,15,29 (default: all)",
    )
    parser.add_argument("--backend", choices=["ort-cpu", "qnn-htp"], help="only this backend (default: every one here)")
    parser.add_argument(
        "--reference",
        metavar="MODEL",
        help="the model the bundle was built from (path or builtin:NAME), for the float32 reference when "
        "the bundle's own model is trimmed (default: the built-in model of the lockfile's identity)",
    )
    parser.add_argument(
        "--text", metavar="FILE", help="UTF-8 text to run (default: the held-out text shipped with mllm-deploy)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per backend (one per line)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred on purpose: verification brings onnxruntime, the engines and the backends
    from mllm_deploy.eval.verify import verify_bundle  # noqa: PLC0415
    from mllm_deploy.eval.verify_render import render_rows, rows_json  # noqa: PLC0415

    text = None if args.text is None else read_text_file(args.text, "text file")
    bundle, rows = verify_bundle(args.bundle, chunks=args.chunks, layers=args.layers, backend=args.backend,
                                 reference=args.reference, text=text, text_name=args.text)  # fmt: skip
    print_diagnostics(bundle.warnings)  # e.g. a qnn-htp bundle on the simulator: for verification, not speed
    print(rows_json(rows) if args.json else render_rows(bundle.lock, rows))
    return ExitCode.OK
