"""`mllm-deploy run`: one prompt (or a JSONL batch of them) through the profile's model, headless.

Tokens stream to stdout and metrics go to stderr; `--json` prints one result object instead;
`--batch FILE.jsonl` reads one request per line and prints one result per line. Ctrl-C stops
generation cleanly, prints the partial result and exits 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from mllm_deploy.cli.common import (
    add_generation_args,
    add_profile_args,
    deployment_for_generation,
    open_chat_session,
    read_text_file,
)
from mllm_deploy.errors import ExitCode, UserError, user_error
from mllm_deploy.interface.batch import BatchRequest, BatchResult, error_line, output_json, parse_batch_line
from mllm_deploy.interface.turns import Turn, run_turn
from mllm_deploy.runtime.report import metrics_line, result_record
from mllm_deploy.runtime.trace import TraceRecorder

if TYPE_CHECKING:
    from mllm_deploy.interface.session import ChatSession


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="generate from one prompt (or a JSONL batch) without the UI",
        description=__doc__.split("\n\n")[0],
    )
    add_profile_args(parser, optional=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    source.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE ('-' for stdin)")
    source.add_argument(
        "--batch",
        metavar="FILE.jsonl",
        help="one JSON request per line: {prompt | messages, raw, max_new_tokens, system, id}; "
        "one JSON result per line out (the schemas: `mllm-deploy schema batch-request|batch-result`)",
    )
    parser.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    add_generation_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    parser.add_argument(
        "--trace", metavar="FILE", help="write a Chrome trace-event JSON of the run (open it in Perfetto)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    deployment = deployment_for_generation(args)
    backend = deployment.backend
    if args.batch:
        lines = read_text_file(args.batch, "batch file").splitlines()
    else:
        prompt = args.prompt if args.prompt is not None else read_text_file(args.prompt_file, "prompt file")
        _refuse_empty(prompt, args)
    session = open_chat_session(deployment)
    if args.batch:
        return run_batch(session, lines, backend=backend, raw_default=args.raw, max_new_default=args.max_new_tokens)
    if args.raw:
        turn = lambda cancel: session.complete(prompt, cancel=cancel, max_new_tokens=args.max_new_tokens)
    else:
        turn = lambda cancel: session.send(prompt, cancel=cancel, max_new_tokens=args.max_new_tokens)
    on_text = None if args.json else _write_stdout
    recorder = _trace_recorder(session) if args.trace else None
    done = run_turn(turn, on_text, recorder.observe if recorder else None)
    trace_path = str(recorder.write(args.trace)) if recorder else None
    load_s = session.model.load_seconds
    if args.json:
        record = result_record(done, load_s=load_s, backend=backend)
        if trace_path:
            record["trace"] = trace_path
        print(json.dumps(record, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(metrics_line(done, load_s=load_s, backend=backend), file=sys.stderr)
    return ExitCode.INTERRUPTED if done.finish_reason == "cancelled" else ExitCode.OK


def _refuse_empty(prompt: str, args: argparse.Namespace) -> None:
    """An empty (or whitespace-only) prompt is refused before the model loads: the model would
    answer it with tokens of nothing in particular."""
    if not prompt.strip():
        if args.prompt is not None:
            raise user_error("the prompt is empty: give some text to send", key="--prompt", value=args.prompt)
        raise user_error("the prompt file is empty: give some text to send", file=args.prompt_file)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _trace_recorder(session: ChatSession) -> TraceRecorder:
    npu = session.model.engine.describe()["npu"]
    return TraceRecorder(None if npu == "none" else npu)


def run_batch(session, lines: list[str], *, backend: str, raw_default: bool, max_new_default: int | None) -> int:
    """Run every request line; bad lines give an error object (and exit 2 at the end)."""
    failed = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            request = parse_batch_line(line, number, raw_default=raw_default)
            if request.prompt is not None and not request.prompt.strip():  # "" is refused by the schema
                raise user_error(f"line {number}: 'prompt' holds only whitespace: give some text to send")
            done = run_turn(_batch_turn(session, request, raw_default, max_new_default), None)
        except UserError as err:
            failed = True
            print(output_json(error_line(number, err)), flush=True)
            continue
        record = result_record(done, load_s=session.model.load_seconds, backend=backend)
        print(output_json(BatchResult.model_validate({"line": number, "id": request.id, **record})), flush=True)
        if done.finish_reason == "cancelled":
            return ExitCode.INTERRUPTED
    return ExitCode.INVALID if failed else ExitCode.OK


def _batch_turn(session, request: BatchRequest, raw_default: bool, max_new_default: int | None) -> Turn:
    """The turn of one request: a raw prompt is continued, anything else goes through the chat template."""
    max_new = request.max_new_tokens if request.max_new_tokens is not None else max_new_default
    if request.prompt is not None and request.is_raw(raw_default):
        prompt = request.prompt
        return lambda cancel: session.complete(prompt, cancel=cancel, max_new_tokens=max_new)
    conversation = request.conversation()
    return lambda cancel: session.reply_to(conversation, system=request.system, cancel=cancel, max_new_tokens=max_new)
