"""The NPU path at run time: per-layer INT8 graphs on the NPU backend plus CPU shadow corrections.

    kernels = load_npu_kernels(resolved, artifacts)
    npu = kernels.run_graph(layer, kind, x)          # NPU (one in-order queue)
    fix = kernels.shadow(layer, kind, x)             # CPU thread, in parallel; None if not shadowed or no outlier
    out = kernels.combine(layer, kind, npu, fix)     # add (gate_up: add, then silu·mul)

Graph kinds and outputs (x is the float32 [chunk, in] input, padded to `chunk_tokens` rows):
    qkv     → [q, k, v]
    o_proj  → [o]
    gate_up → [act] = [silu(gate)·up]   (not shadowed: silu·mul runs inside the graph)
              [gate, up]                 (shadowed: the correction must enter before silu, so the
                                          graph returns both pre-activations; `combine` adds the
                                          correction and applies silu·mul on the CPU)
              [act]                      (split but not shadowed, on an HTP without float math:
                                          run_graph applies silu·mul on the CPU)
    down    → [mlp_out]
`shadow` returns corrections shaped like `run_graph`'s outputs ([gate, up] for gate_up).

`NpuBlockLinears` runs run_graph + shadow + combine one after the other so the float engine can
prefill with NPU linears (the simple sequential path); `NpuPrefillEngine` prefills with them and
decodes on the CPU in float.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from mllm_deploy.backends.base import GraphHandle, StaticRowsLoader
from mllm_deploy.backends.registry import backend_support, open_backend
from mllm_deploy.compile.artifacts import Artifacts
from mllm_deploy.compile.quantize import activation_quant_symmetric
from mllm_deploy.compile.shadow_store import SHADOW_DIR, read_index
from mllm_deploy.forward.layers import silu_mul_
from mllm_deploy.model.linears import GRAPH_KINDS, LINEAR_GROUP
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.plan.passes import tail_chunk_tokens
from mllm_deploy.runtime import device_latency
from mllm_deploy.runtime.shadow import ColdRows, Correction, ShadowLinear, ShadowStats


class NpuLayerKernels:
    """Per-layer static-shape INT8 graphs on the NPU backend plus CPU shadow corrections."""

    def __init__(self, backend, handles: dict, shadows: dict[tuple[int, str], ShadowLinear], *,
                 chunk_tokens: int, backend_label: str, latencies: dict[tuple[int, str], float],
                 tail_handles: dict | None = None, tail_chunk_tokens: int = 0):  # fmt: skip
        self.backend = backend
        self.backend_label = backend_label  # what really runs, e.g. "ort-cpu emulation (AMX INT8)"
        self.chunk_tokens = chunk_tokens  # static chunk size of every graph
        self.shadowed = frozenset(shadows)  # (layer, kind) with shadow correction
        self._handles = handles  # (layer, kind) → GraphHandle
        self.tail_chunk_tokens = tail_chunk_tokens  # static rows of the tail graphs, or 0: none loaded
        self._by_rows = {chunk_tokens: handles, **({tail_chunk_tokens: tail_handles} if tail_handles else {})}
        self._outputs = {key: list(h.outputs) for key, h in handles.items()}
        self._shadows = shadows
        self._latencies = latencies
        self.latency_source = "given"  # where `latencies` come from, in words (set by load_npu_kernels)
        self._lock = threading.Lock()
        self._graph_runs = 0
        self._graph_values = 0  # input activation values given to the NPU graphs
        self._npu_seconds = 0.0

    @property
    def handles(self) -> dict[tuple[int, str], GraphHandle]:
        """(layer, kind) → the loaded graph (read-only use: its shapes, which provider took its nodes)."""
        return dict(self._handles)

    def run_graph(self, layer: int, kind: str, x: np.ndarray) -> list[np.ndarray]:
        """x float32 [rows, in] → the graph's float32 outputs (see the module docstring); rows:
        `chunk_tokens`, or `tail_chunk_tokens` (the same graph at the tail's static size)."""
        graphs = self._by_rows.get(x.shape[0])
        if graphs is None:
            raise ValueError(f"no {kind} graph of {x.shape[0]} rows (static sizes: {sorted(self._by_rows)})")
        handle = graphs[(layer, kind)]
        started = time.perf_counter()
        out = self.backend.run(handle, {LINEAR_GROUP[kind].graph_input: x})
        with self._lock:
            self._graph_runs += 1
            self._graph_values += x.size
            self._npu_seconds += time.perf_counter() - started
        outs = [out[name] for name in self._outputs[(layer, kind)]]
        if kind == "gate_up" and len(outs) == 2 and (layer, kind) not in self._shadows:
            # built split because the HTP generation has no float SiLU·mul (resolver's silu_mul_on_cpu)
            return [silu_mul_(outs[0] if outs[0].flags.writeable else outs[0].copy(), outs[1])]  # [act]
        return outs

    def shadow(self, layer: int, kind: str, x: np.ndarray) -> Correction | None:
        """CPU float correction for x's values beyond the NPU grid; None when the input is not
        shadowed or x has no value beyond the grid."""
        linear = self._shadows.get((layer, kind))
        return None if linear is None else linear.correction(np.asarray(x, np.float32))

    def combine(self, layer: int, kind: str, npu: list[np.ndarray], correction: Correction | None) -> list[np.ndarray]:
        """NPU outputs + correction; for a shadowed gate_up, silu(gate)·up of the corrected pair → [act]."""
        if (layer, kind) not in self._shadows:
            return npu
        fixed = [a if a.flags.writeable else a.copy() for a in npu] if correction is None else correction.add_to(npu)
        if kind == "gate_up":
            return [silu_mul_(fixed[0], fixed[1])]
        return fixed

    def run_linear(self, layer: int, kind: str, x: np.ndarray) -> list[np.ndarray]:
        """run_graph, shadow and combine one after the other (no overlap)."""
        return self.combine(layer, kind, self.run_graph(layer, kind, x), self.shadow(layer, kind, x))

    def stats(self) -> dict:
        """Counters since load: graph runs, values, outliers corrected on the CPU, rows read from disk."""
        total = ShadowStats()
        for linear in self._shadows.values():
            total.add(linear.stats)
        with self._lock:
            runs, values, npu_s = self._graph_runs, self._graph_values, self._npu_seconds
        return {
            "graph_runs": runs,
            "npu_seconds": npu_s,
            "input_values": values,
            "shadow_runs": total.runs,
            "outliers": total.outliers,
            "outlier_fraction": total.outliers / values if values else 0.0,
            "shadow_channels": total.channels,
            "rows_from_disk": total.rows_from_disk,
            "shadow_cpu_seconds": total.cpu_seconds,
        }

    def reset_stats(self) -> None:
        with self._lock:
            self._graph_runs = self._graph_values = 0
            self._npu_seconds = 0.0
        for linear in self._shadows.values():
            with linear._lock:
                linear.stats = ShadowStats()

    def latencies_ms(self) -> dict[tuple[int, str], float]:
        """Per-graph latency profiled at build on this backend."""
        return dict(self._latencies)


def load_npu_kernels(
    resolved, artifacts: Artifacts, layers: Sequence[int] | None = None, *, tail: bool = False
) -> NpuLayerKernels:
    """Load every graph of `artifacts` (`layers`: only those layers') on the resolved backend
    (QNN: the context binaries) and open the shadow rows (hot rows in memory; cold rows read from
    their files on demand). `tail`: also each graph at the plan's tail chunk size
    (`plan.passes.tail_chunk_tokens`; none when the plan has no tail graphs)."""
    backend = open_backend(resolved.backend, **resolved.npu_backend_options())
    cal = artifacts.calibration
    n_layers = len(cal.layer_importance)
    handles: dict[tuple[int, str], GraphHandle] = {}
    tail_handles: dict[tuple[int, str], GraphHandle] = {}
    tail_rows = tail_chunk_tokens(resolved.profile, resolved.backend) if tail else 0
    if tail_rows and not isinstance(backend, StaticRowsLoader):
        raise RuntimeError(f"{resolved.backend} cannot load graphs at the tail chunk size {tail_rows}")
    shadows: dict[tuple[int, str], ShadowLinear] = {}
    contexts = backend_support(resolved.backend).context_binaries
    for layer in range(n_layers) if layers is None else layers:
        for kind in GRAPH_KINDS:
            path = artifacts.context_path(layer, kind) if contexts else artifacts.graph_path(layer, kind)
            if tail_rows:  # one copy of the weights behind both static sizes
                assert isinstance(backend, StaticRowsLoader)
                sizes = backend.load_sizes(path, (artifacts.lock.chunk_size, tail_rows))
                handle, tail_handles[(layer, kind)] = sizes[artifacts.lock.chunk_size], sizes[tail_rows]
            else:
                handle = backend.load(path)
            handles[(layer, kind)] = handle
            if (layer, kind) in cal.shadowed:
                grid = activation_quant_symmetric(cal.input(layer, kind).clamp, cal.activations)
                lo, hi = grid.representable_range
                index = read_index(artifacts.root, layer, kind)
                hot = np.asarray(index.hot_channels, np.int64)
                hot_rows = np.load(artifacts.root / SHADOW_DIR / index.hot_file)  # [n_hot, out_total]
                cold = ColdRows.open(artifacts.root / SHADOW_DIR, index)
                splits = tuple(shape[1] for shape in handle.outputs.values())
                shadows[(layer, kind)] = ShadowLinear(lo, hi, hot_rows, hot, cold, splits)
    seed, source = artifacts.latencies_ms, "the artifacts' latencies.json"
    soc = artifacts.lock.soc_model
    if contexts and soc is not None and device_latency.on_hexagon_device():  # never a simulator's timings
        seed, source = device_latency.device_latencies(backend, handles, artifacts.root, soc)
    latencies = {(int(k.split("/")[0]), k.split("/")[1]): v for k, v in seed.items()}
    kernels = NpuLayerKernels(backend, handles, shadows, chunk_tokens=artifacts.lock.chunk_size,
                              backend_label=resolved.backend_label, latencies=latencies,
                              tail_handles=tail_handles, tail_chunk_tokens=tail_rows)  # fmt: skip
    kernels.latency_source = source
    return kernels


class NpuBlockLinears:
    """`BlockLinears` of one layer on the NPU kernels (sequential: graph, then shadow, then add).

    Inputs of any row count T are cut into `chunk_tokens` slices, the last one zero-padded."""

    def __init__(self, kernels: NpuLayerKernels, layer: int):
        self.kernels, self.layer = kernels, layer

    def _run(self, kind: str, x: np.ndarray) -> list[np.ndarray]:
        chunk = self.kernels.chunk_tokens
        pieces = []
        for start in range(0, x.shape[0], chunk):
            part = x[start : start + chunk]  # [<= chunk, in]
            n = part.shape[0]
            if n < chunk:
                part = np.concatenate([part, np.zeros((chunk - n, x.shape[1]), np.float32)])
            outs = self.kernels.run_linear(self.layer, kind, np.ascontiguousarray(part, np.float32))
            pieces.append([o[:n] for o in outs])
        return [np.concatenate(col) if len(pieces) > 1 else col[0] for col in zip(*pieces, strict=True)]

    def qkv(self, x_norm):
        q, k, v = self._run("qkv", x_norm)  # [T, q_dim], [T, kv_dim] x2
        return q, k, v

    def attn_output(self, attn):
        return self._run("o_proj", attn)[0]  # [T, hidden]

    def mlp(self, x_norm):
        act = self._run("gate_up", x_norm)[0]  # [T, ffn]
        return self._run("down", act)[0]  # [T, hidden]


class NpuPrefillEngine:
    """Prefill with NPU linears (static chunks of `chunk_tokens`, last one padded); decode and
    everything else on the float engine: what `eval` measures (new_cache, prefill, decode_step)."""

    def __init__(self, float_engine, kernels: NpuLayerKernels, kv_scales=None, chunk_attention=None):
        self.float_engine = float_engine
        self.kernels = kernels
        self.kv_scales = kv_scales  # KVScales of an int8 KV cache, or None: float32
        # same weights and tables, NPU linears; Int8ChunkAttention, or None: float32 attention
        self.npu_engine = float_engine.with_linears(
            [NpuBlockLinears(kernels, i) for i in range(float_engine.spec.n_layers)], chunk_attention
        )
        self.backend_label = kernels.backend_label

    @property
    def spec(self) -> ModelSpec:
        return self.float_engine.spec

    def new_cache(self, capacity: int):
        return self.float_engine.new_cache(capacity, scales=self.kv_scales)

    def prefill_chunks(self, cache, token_ids: Sequence[int], *, chunk_size: int | None = None,
                       pad_last_chunk: bool = True, logit_rows="last"):  # fmt: skip
        return self.npu_engine.prefill_chunks(
            cache, token_ids, chunk_size=self.kernels.chunk_tokens, pad_last_chunk=True, logit_rows=logit_rows
        )

    def prefill(self, cache, token_ids, *, chunk_size: int | None = None, pad_last_chunk: bool = True, **kw):
        return self.npu_engine.prefill(
            cache, token_ids, chunk_size=self.kernels.chunk_tokens, pad_last_chunk=True, **kw
        )

    def decode_step(self, cache, token_id: int) -> np.ndarray:
        return self.float_engine.decode_step(cache, token_id)
