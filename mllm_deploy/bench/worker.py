"""One benchmark configuration, measured in this process (the runner starts one per configuration).

    python -m mllm_deploy.bench.worker < request.json > rows.json

request: {"profile": path|null, "overrides": [...], "settings": {...}, "prompt_tokens": [...],
          "gen_tokens": N, "repeat": R, "warmup": W, "trace": path|null}
Every figure is measured here: wall times with perf_counter, busy time of each executor from
its subgraph spans, process CPU time from getrusage, peak RSS from ru_maxrss.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

from threadpoolctl import threadpool_limits

from mllm_deploy.bench.prompt_text import prompt_ids
from mllm_deploy.errors import UserError
from mllm_deploy.events import GenerationDone, PrefillDone
from mllm_deploy.interface.deployment import Deployment, load_deployment
from mllm_deploy.interface.engines import load_deployment_weights, open_deployment_engine
from mllm_deploy.model import load_tokenizer
from mllm_deploy.profile import profile_hash
from mllm_deploy.runtime.dag_engine import DagEngine
from mllm_deploy.runtime.engine import Engine, with_subgraph_events
from mllm_deploy.runtime.generate import GenerationRequest, generate
from mllm_deploy.runtime.report import peak_rss_mb
from mllm_deploy.runtime.trace import TraceRecorder


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_record() -> dict:
    return {
        "cpu": _cpu_model(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }


class _Rig:
    """The loaded model of one configuration and what it really runs."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.resolved = deployment.running  # as it runs here: this machine's threads and labels
        spec = self.resolved.spec
        self.tokenizer = load_tokenizer(spec)
        weights = load_deployment_weights(self.resolved)
        self.blas_limit = threadpool_limits(limits=self.resolved.cpu_threads, user_api="blas")
        self.engine: Engine = open_deployment_engine(deployment, weights)
        self.backend = self.engine.describe()
        self.slots = self.engine.executor_slots()


def measure_once(rig: _Rig, ids: list[int], gen_tokens: int, recorder: TraceRecorder | None = None) -> dict:
    engine = rig.engine
    cache = engine.new_cache(len(ids) + gen_tokens + 1)
    static = engine.static_chunk_tokens
    request = GenerationRequest(
        max_new_tokens=gen_tokens,
        chunk_size=static or rig.resolved.profile.prefill.chunk_size,
        pad_last_chunk=static is not None,
    )
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    events = with_subgraph_events(generate(engine, cache, ids, request, rig.tokenizer.stream()), engine)
    done = None
    prefill_cpu = prefill_wall = None
    for event in events:
        if recorder is not None:
            recorder.observe(event)
        if isinstance(event, PrefillDone):
            prefill_wall, prefill_cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
        if isinstance(event, GenerationDone):
            done = event
    assert done is not None and done.metrics is not None  # generate() always ends with a measured GenerationDone
    m = done.metrics
    if isinstance(engine, DagEngine):  # busy time summed from its subgraph spans
        busy = dict(engine.prefill.last.busy_seconds)
        span = engine.prefill.last.seconds
    else:  # the float engine computes synchronously: the CPU executor is busy all of prefill
        span = m.prefill_seconds or 0.0
        busy = {"cpu": span}
    return {
        "ttft_ms": m.ttft_ms,
        "prefill_tokens_per_s": m.prefill_tokens_per_s,
        "decode_tokens_per_s": m.decode_tokens_per_s,
        "utilization": {p: round(b / (span * rig.slots.get(p, 1)), 3) if span else None for p, b in busy.items()},
        "process_cpu_cores": round(prefill_cpu / prefill_wall, 2) if prefill_wall and prefill_cpu is not None else None,
    }


def _spread(values: list[float]) -> dict:
    return {"min": round(min(values), 1), "max": round(max(values), 1)}


def run_request(request: dict) -> list[dict]:
    deployment = load_deployment(
        request.get("profile"), request.get("overrides", []), opt_in=request.get("opt_in"), to_run=True
    )
    host = host_record()
    load_started = time.perf_counter()
    rig = _Rig(deployment)
    load_s = time.perf_counter() - load_started
    rows = []
    for n_tokens in request["prompt_tokens"]:
        ids = prompt_ids(rig.tokenizer, n_tokens)
        for _ in range(request.get("warmup", 1)):
            measure_once(rig, ids, request["gen_tokens"])
        runs = []
        recorder = None
        for i in range(request.get("repeat", 3)):
            last = i == request.get("repeat", 3) - 1
            recorder = TraceRecorder(rig.backend["npu"]) if last and request.get("trace") else None
            runs.append(measure_once(rig, ids, request["gen_tokens"], recorder))
        prefill = [r["prefill_tokens_per_s"] for r in runs]
        decode = [r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"] is not None]
        median_run = sorted(runs, key=lambda r: r["prefill_tokens_per_s"])[len(runs) // 2]
        trace_path = None
        if recorder is not None:
            trace_path = str(recorder.write(_trace_path(request["trace"], n_tokens, len(request["prompt_tokens"]))))
        rows.append({
            "settings": request.get("settings", {}),
            "prompt_tokens": n_tokens,
            "gen_tokens": request["gen_tokens"],
            "repeat": len(runs),
            "ttft_ms": round(statistics.median(r["ttft_ms"] for r in runs), 1),
            "prefill_tokens_per_s": round(statistics.median(prefill), 1),
            "prefill_tokens_per_s_spread": _spread(prefill),
            "decode_tokens_per_s": round(statistics.median(decode), 1) if decode else None,
            "decode_tokens_per_s_spread": _spread(decode) if decode else None,
            "peak_rss_mb": None,  # filled below: the process peak after every run of this config
            "utilization": median_run["utilization"],
            "process_cpu_cores": median_run["process_cpu_cores"],
            "backend": rig.backend,
            "scheduler": rig.resolved.profile.scheduler.policy,
            "threads": {"cpu": rig.resolved.cpu_threads, "npu": rig.resolved.npu_threads,
                        "target_cpu": rig.deployment.resolved.cpu_threads},
            "target": rig.deployment.resolved.caps.id,
            "runs_as": rig.deployment.here.mode,  # native, hexagon, simulator or emulation
            "chunk_size": rig.resolved.profile.prefill.chunk_size,
            "load_s": round(load_s, 2),
            "profile_hash": profile_hash(rig.resolved.profile)[:12],  # the canonical hash, shortened
            "host": host,
            "trace": trace_path,
        })  # fmt: skip
    peak = round(peak_rss_mb(), 1)
    for row in rows:
        row["peak_rss_mb"] = peak
    return rows


def _trace_path(base: str, n_tokens: int, n_lengths: int) -> str:
    if n_lengths == 1:
        return base
    stem, dot, ext = base.rpartition(".")
    return f"{stem}-p{n_tokens}.{ext}" if dot else f"{base}-p{n_tokens}"


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        rows = run_request(request)
    except UserError as err:
        print(
            json.dumps({"error": [d.render() for d in err.warnings + err.diagnostics], "exit_code": int(err.exit_code)})
        )
        return int(err.exit_code)
    except KeyboardInterrupt:
        return 130
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
