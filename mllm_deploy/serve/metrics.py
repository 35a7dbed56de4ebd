"""`/metrics`: the server's measured counters in the Prometheus text format (prometheus_client).

Every value is measured: requests by endpoint and status, prompt/completion/reused tokens, TTFT
and the prefill and decode rates of each request (histograms), the queue depth, and each
processor's busy seconds and busy fraction since the engine became ready (busy slot-time over
slots x wall time; see `worker` for how busy time is measured).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mllm_deploy.serve.worker import JobFinished

PREFIX = "mllm_deploy"
CONTENT_TYPE = CONTENT_TYPE_LATEST
RATE_BUCKETS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)  # tokens/s
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds

disable_created_metrics()  # no `*_created` timestamp series: only what was measured


class ServeMetrics:
    """The registry of one server (not the process-global one: tests run several apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.reused_tokens = Counter(f"{PREFIX}_reused_tokens", "Prompt tokens reused from a KV cache", registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Generated tokens", registry=r)
        self.cancelled = Counter(f"{PREFIX}_cancelled_requests", "Requests stopped (client gone, shutdown)", registry=r)
        self.rejected = Counter(
            f"{PREFIX}_rejected_requests", "Requests refused because the queue was full", registry=r
        )
        self.ttft = Histogram(f"{PREFIX}_ttft_seconds", "Time to first token (queue wait included)",
                              buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time a request waited for the engine",
                                    buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.prefill_rate = Histogram(f"{PREFIX}_prefill_tokens_per_second", "Prefill rate of each request",
                                      buckets=RATE_BUCKETS, registry=r)  # fmt: skip
        self.decode_rate = Histogram(f"{PREFIX}_decode_tokens_per_second", "Decode rate of each request",
                                     buckets=RATE_BUCKETS, registry=r)  # fmt: skip
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for the engine", registry=r)
        self.running = Gauge(f"{PREFIX}_requests_running", "Requests on the engine now (0 or 1)", registry=r)
        self.kv_tokens = Gauge(f"{PREFIX}_kv_cached_tokens", "Tokens held in the KV caches", registry=r)
        self.busy_seconds = Gauge(f"{PREFIX}_processor_busy_seconds", "Measured busy seconds since ready",
                                  ["processor"], registry=r)  # fmt: skip
        self.busy_fraction = Gauge(f"{PREFIX}_processor_busy_fraction",
                                   "Busy slot-time / (slots x wall time) since the engine became ready",
                                   ["processor"], registry=r)  # fmt: skip
        self.ready = Gauge(f"{PREFIX}_ready", "1 once the engine has loaded", registry=r)

    def record_finished(self, finished: JobFinished) -> None:
        """A request's generation ended (called on the engine's thread)."""
        done = finished.done
        self.prompt_tokens.inc(done.prompt_tokens)
        self.reused_tokens.inc(done.reused_tokens)
        self.completion_tokens.inc(done.generated_tokens)
        self.queue_wait.observe(finished.queue_seconds)
        if done.finish_reason == "cancelled":
            self.cancelled.inc()
        m = done.metrics
        if m is None:
            return
        if m.ttft_ms is not None:
            self.ttft.observe(finished.queue_seconds + m.ttft_ms / 1000.0)
        if m.prefill_tokens_per_s is not None:
            self.prefill_rate.observe(m.prefill_tokens_per_s)
        if m.decode_tokens_per_s is not None:
            self.decode_rate.observe(m.decode_tokens_per_s)

    def render(
        self,
        *,
        queue_depth: int,
        running: int,
        kv_tokens: int,
        busy: dict[str, float],
        slots: dict[str, int],
        since: float | None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> bytes:
        """The text exposition, with the gauges read now."""
        self.queue_depth.set(queue_depth)
        self.running.set(running)
        self.kv_tokens.set(kv_tokens)
        self.ready.set(0 if since is None else 1)
        wall = clock() - since if since is not None else 0.0
        for processor, seconds in busy.items():
            self.busy_seconds.labels(processor).set(seconds)
            capacity = slots.get(processor, 1) * wall
            self.busy_fraction.labels(processor).set(min(1.0, seconds / capacity) if capacity > 0 else 0.0)
        return generate_latest(self.registry)
