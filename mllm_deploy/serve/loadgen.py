"""A load generator for a running `serve` (standard library only): streamed chat requests from N
concurrent clients, each timed on the client side, and the figures the README and the load test
report (requests/s, TTFT and latency p50/p95, generated tokens/s).

    results = run_load(base_url, model, prompts, concurrency=8, requests=32, max_tokens=16)
    summary = summarize(results, wall_seconds)
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class LoadResult:
    index: int  # which request (its prompt is prompts[index % len(prompts)])
    status: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    ttft_s: float | None  # request sent to the first content chunk
    latency_s: float  # request sent to `[DONE]`
    done: bool  # the stream ended with `[DONE]`


def stream_chat(
    base_url: str,
    model: str,
    prompt: str,
    *,
    max_tokens: int,
    index: int = 0,
    api_key: str | None = None,
    timeout: float = 300.0,
) -> LoadResult:
    """One streamed chat request, timed from sending it to `[DONE]`."""
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    started = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            return LoadResult(index, response.status, "", None, 0, None, time.perf_counter() - started, False)
        pieces: list[str] = []
        ttft = finish = None
        tokens = 0
        done = False
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                content = choice["delta"].get("content")
                if content:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    pieces.append(content)
                finish = choice.get("finish_reason") or finish
        return LoadResult(index, 200, "".join(pieces), finish, tokens, ttft, time.perf_counter() - started, done)
    finally:
        conn.close()


def run_load(
    base_url: str,
    model: str,
    prompts: Sequence[str],
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    api_key: str | None = None,
) -> tuple[list[LoadResult], float]:
    """`requests` streamed chats from `concurrency` client threads (request i asks prompts[i % n]);
    returns the results in request order and the wall time of the whole run."""
    results: list[LoadResult | None] = [None] * requests
    next_index = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            results[i] = stream_chat(base_url, model, prompts[i % len(prompts)], max_tokens=max_tokens, index=i,
                                     api_key=api_key)  # fmt: skip

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return [r for r in results if r is not None], wall


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(results: Sequence[LoadResult], wall_seconds: float) -> dict[str, float]:
    """requests/s, TTFT and latency p50/p95 (ms), generated tokens/s over the run."""
    ok = [r for r in results if r.status == 200 and r.done]
    ttfts = [r.ttft_s * 1000.0 for r in ok if r.ttft_s is not None]
    latencies = [r.latency_s * 1000.0 for r in ok]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(results),
        "completed": len(ok),
        "wall_s": round(wall_seconds, 2),
        "requests_per_s": round(len(ok) / wall_seconds, 2),
        "ttft_p50_ms": round(percentile(ttfts, 50), 1),
        "ttft_p95_ms": round(percentile(ttfts, 95), 1),
        "latency_p50_ms": round(percentile(latencies, 50), 1),
        "latency_p95_ms": round(percentile(latencies, 95), 1),
        "tokens_per_s": round(tokens / wall_seconds, 1),
    }
