"""`mllm-deploy serve`: the deployment as a local OpenAI-compatible HTTP server.

Endpoints: POST /v1/chat/completions, POST /v1/completions (stream as server-sent events),
GET /v1/models, GET /health, GET /metrics (Prometheus). One engine serves every client through a
fair queue. Binds to loopback unless --host says otherwise; --api-key (or MLLM_DEPLOY_API_KEY)
requires `Authorization: Bearer KEY`. SIGINT/SIGTERM stop it gracefully (exit 0).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from mllm_deploy.cli.common import add_opt_in_args, add_profile_args, deployment_to_run, verbosity
from mllm_deploy.errors import user_error

API_KEY_ENV = "MLLM_DEPLOY_API_KEY"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the deployment as a local OpenAI-compatible HTTP API",
        description=__doc__.split("\n\n")[0],
    )
    add_profile_args(parser, optional=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (default: 8080; 0: any free port)")
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${API_KEY_ENV} if set)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=16, metavar="N", help="requests that may wait; more get 503 (default: 16)"
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, metavar="N", help="largest request body (default: 1 MiB)"
    )
    parser.add_argument(
        "--kv-slots", type=int, default=2, metavar="N", help="KV caches kept for prefix reuse (default: 2)"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="on SIGINT/SIGTERM, seconds the running request may take to finish before it is cancelled (default: 10)",
    )
    add_opt_in_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred: uvicorn, starlette and the engine are only needed by this command
    from mllm_deploy.interface.session import load_model  # noqa: PLC0415
    from mllm_deploy.serve.app import ServeSettings  # noqa: PLC0415
    from mllm_deploy.serve.server import serve  # noqa: PLC0415

    settings = ServeSettings(
        max_queue=_at_least(args.max_queue, 1, "--max-queue"),
        max_body_bytes=_at_least(args.max_body_bytes, 1024, "--max-body-bytes"),
        kv_slots=_at_least(args.kv_slots, 1, "--kv-slots"),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
    )
    if not 0 <= args.port <= 65535:
        raise user_error("--port must be 0..65535", key="--port", value=args.port)
    if args.shutdown_timeout <= 0:
        raise user_error("--shutdown-timeout must be positive", key="--shutdown-timeout", value=args.shutdown_timeout)
    deployment = deployment_to_run(args)
    if settings.api_key is None and not _is_loopback(args.host):
        print(f"serve: warning: listening on {args.host} without an API key: anyone who can reach it may use it "
              f"(set --api-key or ${API_KEY_ENV})", file=sys.stderr)  # fmt: skip
    quiet = verbosity(args) < 0
    name, backend = deployment.resolved.spec.name, deployment.backend

    def listening(url: str) -> None:
        print(f"serve: {name} ({backend}) at {url}/v1 — loading the engine (GET /health)", file=sys.stderr, flush=True)

    def ready(state) -> None:
        if not quiet:
            seconds = state.model.load_seconds if state.model is not None else 0.0
            print(f"serve: ready ({seconds:.1f} s to load)", file=sys.stderr, flush=True)

    return serve(
        deployment,
        load_model,
        settings,
        host=args.host,
        port=args.port,
        shutdown_seconds=args.shutdown_timeout,
        access_log=verbosity(args) > 0,
        on_listening=listening,
        on_ready=ready,
    )


def _at_least(value: int, low: int, flag: str) -> int:
    if value < low:
        raise user_error(f"{flag} must be at least {low}", key=flag, value=value)
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
