"""Benchmark `mllm-deploy serve` under load: requests/s, TTFT p50/p95 and generated tokens/s at
concurrency 1, 4 and 8 (streamed chat requests, greedy, client-side timing over loopback).

    .venv/bin/python scripts/bench_serve.py                      # the default profile
    .venv/bin/python scripts/bench_serve.py PROFILE --set KEY=VALUE ... --requests 16 --max-tokens 32
    .venv/bin/python scripts/bench_serve.py --url http://127.0.0.1:8080   # a server already running

Starts the server itself (port 0, loopback) unless --url is given, waits until /health says ok,
runs one warm-up request, then each concurrency in turn; prints a table (or --json lines).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request

from mllm_deploy.serve.loadgen import run_load, summarize

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three primary colours.",
    "What does a CPU do?",
    "Give me a short greeting.",
    "What is 12 times 12?",
    "Describe a cat in five words.",
    "Why is the sky blue? Answer briefly.",
]


def start_server(profile: str | None, sets: list[str], extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mllm_deploy", "serve", "--port", "0", "--max-queue", "64"]
    cmd += ([profile] if profile else []) + [p for s in sets for p in ("--set", s)] + extra
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url: list[str] = []
    found = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            if " at http://" in line and not url:
                url.append(line.split(" at ", 1)[1].split("/v1", 1)[0])
                found.set()
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    found.wait(600)
    if not url:
        raise SystemExit(f"serve did not start (exit {proc.poll()})")
    return proc, url[0]


def wait_ready(url: str, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    raise SystemExit("serve never became ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", nargs="?", help="profile or bundle (default: the built-in default profile)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--url", help="a running server instead of starting one")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated client counts (default: 1,4,8)")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency (default: 16)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default: 32)")
    parser.add_argument("--json", action="store_true", help="one JSON object per concurrency")
    parser.add_argument("--emulate", action="store_true", help="pass --emulate to serve (a Hexagon profile here)")
    args = parser.parse_args()

    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(args.profile, args.sets, ["--emulate"] if args.emulate else [])
    try:
        health = wait_ready(url)
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as response:
            model = json.loads(response.read())["data"][0]["id"]
        run_load(url, model, PROMPTS[:1], concurrency=1, requests=1, max_tokens=args.max_tokens)  # warm-up
        if not args.json:
            print(f"model {model}, backend {health.get('backend')}; {args.requests} requests per row, "
                  f"max_tokens {args.max_tokens}, greedy, streamed")  # fmt: skip
            print(
                f"{'clients':>7} {'req/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} {'lat p50':>8} {'lat p95':>8} {'tok/s':>7}"
            )
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            results, wall = run_load(url, model, PROMPTS, concurrency=concurrency, requests=args.requests,
                                     max_tokens=args.max_tokens)  # fmt: skip
            s = summarize(results, wall)
            if args.json:
                print(json.dumps({"concurrency": concurrency, "model": model, "backend": health.get("backend"), **s}))
            else:
                print(f"{concurrency:>7} {s['requests_per_s']:>7.2f} {s['ttft_p50_ms']:>7.0f}ms {s['ttft_p95_ms']:>7.0f}ms "
                      f"{s['latency_p50_ms'] / 1000:>7.2f}s {s['latency_p95_ms'] / 1000:>7.2f}s {s['tokens_per_s']:>7.1f}"
                      + ("" if s["completed"] == s["requests"] else f"  ({s['requests'] - s['completed']} failed)"))  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            code = proc.wait(120)
            if code != 0:
                print(f"serve exited {code}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
