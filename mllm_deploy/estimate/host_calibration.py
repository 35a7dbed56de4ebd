"""The host prices itself from what was measured here: the build's profiled graph latencies.

`build` times every INT8 graph of a profile on this machine's backend and stores the medians in its
cache entry (`latencies.json`, "layer/kind" -> ms). When the profile being estimated on `host` has
been built, those measurements replace the cost model's formula for the NPU graphs, and the plan
uses the shadowed inputs its calibration chose (as `plan` does). Without a build, or on a catalogued
device, the catalog's figures price everything and the row's `calibration` says so.

The CPU's prefill attention is timed here too: the runtime's own kernel
(`forward.layers.causal_attention`, one BLAS thread as the out-of-order executor runs it) at the
model's head layout, for the chunk's rows against two context lengths; time grows linearly with the
keys in context (the score matrix), so two points give the line. The other CPU figures of the
host's cost model were measured here once (their sources are in `host.toml`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

from mllm_deploy.device.models import Capabilities
from mllm_deploy.forward.layers import causal_attention
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.resolve import Resolved

if TYPE_CHECKING:  # at run time the compiler's modules load only when a host build is looked up
    from mllm_deploy.compile.artifacts import Artifacts

AttentionSeconds = Callable[[int, int], float]
"""(query rows, keys in context) -> seconds of one prefill attention subgraph's kernel."""


def measured_npu_latencies(
    resolved: Resolved, caps: Capabilities, *, live: bool = True
) -> tuple[dict[str, float], str, tuple[tuple[int, str], ...] | None, float]:
    """(layer/kind -> ms measured at build, what prices this row, calibrated shadow inputs or None,
    load factor). `live`: re-time one graph now and scale the build's latencies (and the host's
    measured decode rate) to this moment's load."""
    catalog = f"{caps.id} cost model (device catalog; figures and sources in device/catalog/{caps.id}.toml)"
    if caps.id != "host" or resolved.backend == "none":
        return {}, catalog, None, 1.0
    # deferred on purpose: finding a build brings the compiler's modules (onnx), only for the host
    from mllm_deploy.compile.build import find_artifacts  # noqa: PLC0415

    artifacts = find_artifacts(resolved)
    if artifacts is None:
        return {}, catalog + "; not built here, so no measured graph latencies (run `mllm-deploy build`)", None, 1.0
    shadow = tuple(artifacts.calibration.shadow_inputs)
    factor, how = _load_factor(artifacts, resolved) if live else (1.0, "as measured at build")
    label = (
        f"host: NPU graphs from the build's measured latencies ({len(artifacts.latencies_ms)} graphs, "
        f"{resolved.backend_label}) x {factor:.2f} ({how}); CPU side from host.toml's measured figures"
    )
    return {key: ms * factor for key, ms in artifacts.latencies_ms.items()}, label, shadow, factor


LOAD_PROBE = (0, "gate_up")
"""The graph timed again now, to carry the build's latencies over to this moment's load."""


def _load_factor(artifacts: Artifacts, resolved: Resolved) -> tuple[float, str]:
    """How much slower (or faster) the build's own graph runs now than when the build timed it: on a
    shared machine the load changes, and every latency of the build moves with it."""
    layer, kind = LOAD_PROBE
    then = artifacts.latencies_ms.get(f"{layer}/{kind}")
    path = artifacts.graph_path(layer, kind)
    if not then or not path.is_file():
        return 1.0, "no graph to re-time"
    # deferred on purpose: onnxruntime loads only when a built host profile is estimated
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, resolved.npu_threads)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        if arg.type != "tensor(float)" or not all(isinstance(d, int) for d in arg.shape):
            return 1.0, f"graph input {arg.name} is not a static float tensor"
        feeds[arg.name] = rng.standard_normal(arg.shape, dtype=np.float32)
    session.run(None, feeds)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    now_ms = float(np.median(times)) * 1e3
    return now_ms / then, f"L{layer}.{kind} re-timed now: {now_ms:.2f} ms vs {then:.2f} ms at build"


def _time_attention(rows: int, keys: int, n_heads: int, n_kv_heads: int, head_dim: int, repeat: int = 3) -> float:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((rows, n_heads, head_dim), dtype=np.float32)
    k = rng.standard_normal((n_kv_heads, keys, head_dim), dtype=np.float32)
    v = rng.standard_normal((n_kv_heads, keys, head_dim), dtype=np.float32)
    times = []
    with threadpool_limits(limits=1, user_api="blas"):
        causal_attention(q, k, v, keys - rows, n_kv_heads)  # warm the scratch buffers and mask
        for _ in range(repeat):
            start = time.perf_counter()
            causal_attention(q, k, v, keys - rows, n_kv_heads)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


@lru_cache(maxsize=32)
def _attention_line(rows: int, n_heads: int, n_kv_heads: int, head_dim: int) -> tuple[float, float]:
    """(seconds at no context, seconds per key) of one attention over `rows` query rows, measured."""
    near, far = rows, 4 * rows
    t_near = _time_attention(rows, near, n_heads, n_kv_heads, head_dim)
    t_far = _time_attention(rows, far, n_heads, n_kv_heads, head_dim)
    per_key = max(0.0, (t_far - t_near) / (far - near))
    return max(0.0, t_near - per_key * near), per_key


def measured_attention(spec: ModelSpec) -> AttentionSeconds:
    """The host's prefill attention time per (rows, keys), from the runtime's kernel timed here."""

    def seconds(rows: int, keys: int) -> float:
        base, per_key = _attention_line(rows, spec.n_heads, spec.n_kv_heads, spec.head_dim)
        return base + per_key * keys

    return seconds
