"""The NPU path as `generate()` drives it: DAG prefill on the executors, INT8 decode on the CPU.

`DagEngine` implements `runtime.engine.Engine`, like the float engine, so `generate()`, sessions
and prefix reuse work unchanged. Subgraph events (SubgraphStarted/Finished) collect in
`pending_events`; `runtime.engine.with_subgraph_events` interleaves them into a turn's event
stream for front ends. Artifacts come from the caller (a bundle or a build): nothing compiles here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from mllm_deploy.compile.artifacts import Artifacts
from mllm_deploy.events import SubgraphEvent
from mllm_deploy.forward.float_engine import FLOAT_ENGINE_NAME, FloatEngine
from mllm_deploy.forward.kv_cache import KVCache, KVScales
from mllm_deploy.model.spec import LlamaWeights
from mllm_deploy.plan import build_plan
from mllm_deploy.plan.passes import tail_chunk_tokens
from mllm_deploy.resolve import Resolved
from mllm_deploy.runtime.attention_int8 import Int8ChunkAttention
from mllm_deploy.runtime.dag_prefill import DagPrefill
from mllm_deploy.runtime.decode_fast import Int8Decoder
from mllm_deploy.runtime.npu_kernels import load_npu_kernels
from mllm_deploy.runtime.scheduler import LatencyModel, PolicyName


class DagEngine:
    def __init__(
        self,
        float_engine: FloatEngine,
        prefill: DagPrefill,
        decoder,
        *,
        npu_label: str,
        kv_scales: KVScales | None = None,
    ):
        self.float_engine = float_engine
        self.kv_scales = kv_scales  # int8 KV cache steps, or None: float32
        self.spec = float_engine.spec
        self.weights = float_engine.weights
        self.rope = float_engine.rope
        self.prefill = prefill
        self.decoder = decoder  # Int8Decoder, or None: float decode
        self.npu_label = npu_label  # what played the NPU, for lanes and reports
        self.cancel: threading.Event | None = None  # checked between subgraphs during prefill
        self.pending_events: list = []
        prefill.on_event = self.pending_events.append

    @property
    def attention_name(self) -> str:
        """Arithmetic of prefill attention (reports and the bench's `backend`)."""
        return "int8" if self.prefill.chunk_attention is not None else "float32"

    @property
    def decode_name(self) -> str:
        """What decodes, and over which KV cache storage (reports and the bench's `backend`)."""
        kv = "kv-int8" if self.kv_scales is not None else "kv-float32"
        return f"{self.decoder.name if self.decoder is not None else FLOAT_ENGINE_NAME} {kv}"

    @property
    def static_chunk_tokens(self) -> int:
        """The NPU graphs' static chunk: every prefill chunk is padded to it."""
        return self.prefill.chunk_tokens

    def describe(self) -> dict[str, str]:
        tail = self.prefill.tail_chunk_tokens
        return {
            "npu": self.npu_label,
            "prefill": f"dag {self.prefill.policy}" + (f", tail chunks of {tail}" if tail else ""),
            "attention": self.attention_name,
            "decode": self.decode_name,
        }

    def route_subgraph_events(self, sink: Callable[[SubgraphEvent], None]) -> Callable[[], None]:
        """Send subgraph events to `sink` as they happen (on the prefill's dispatch thread) instead
        of collecting them for `drain_events`; returns the function that undoes it."""
        previous = self.prefill.on_event
        self.prefill.on_event = sink

        def restore() -> None:
            self.prefill.on_event = previous

        return restore

    def executor_slots(self) -> dict[str, int]:
        return {name: executor.threads for name, executor in self.prefill.executors.items()}

    def new_cache(self, capacity: int) -> KVCache:
        return self.float_engine.new_cache(capacity, scales=self.kv_scales)

    def prefill_chunks(
        self,
        cache: KVCache,
        token_ids: Sequence[int],
        *,
        chunk_size: int,
        pad_last_chunk: bool = False,
        logit_rows: str = "last",
    ) -> Iterator:
        """Like FloatEngine.prefill_chunks; every chunk is padded to a static size of the graphs
        (`chunk_size`, or the tail chunks' `tail_chunk_size` where the plan chooses them)."""
        if logit_rows != "last":
            raise ValueError("the DAG prefill returns logits of the last token only")
        if chunk_size != self.prefill.chunk_tokens:
            raise ValueError(f"chunk_size {chunk_size} differs from the NPU graphs' {self.prefill.chunk_tokens}")
        return self.prefill.run(cache, token_ids, cancel=self.cancel)

    def decode_step(self, cache: KVCache, token_id: int):
        if self.decoder is None:
            return self.float_engine.decode_step(cache, token_id)
        return self.decoder.decode_step(cache, token_id)

    def drain_events(self) -> list:
        events, self.pending_events[:] = list(self.pending_events), []
        return events

    def warm_up(self) -> None:
        """Start the executor threads and touch each graph once (a one-chunk prefill of each
        static chunk size the plans use: a 2-token prompt, which may run as a tail chunk, and a
        full chunk when it did not), then one decode step."""
        size = self.prefill.chunk_tokens
        cache = self.new_cache(size + 2)
        for n in (2, size):
            if n == size and self.prefill.chunk_rows(2) == (size,):
                break  # the 2-token prompt ran a full chunk already
            cache.reset()
            for _ in self.prefill_chunks(cache, [0] * n, chunk_size=size):
                pass
        self.decode_step(cache, 0)
        self.drain_events()

    def close(self) -> None:
        self.prefill.close()


def check_shadow_agreement(plan, shadowed: frozenset) -> None:
    """Every linear the kernels correct needs a shadow subgraph in the plan (else its correction
    would be skipped). A planned shadow the kernels do not need is a no-op (`shadow` -> None)."""
    planned = {(s.layer, s.id.split(".")[-2]) for s in plan.subgraphs if s.kind == "shadow" and s.chunk == 0}
    missing = sorted(set(shadowed) - planned)
    if missing:
        raise RuntimeError(f"the plan has no shadow subgraph for linears the NPU kernels correct: {missing}")


def seeded_latencies(kernels) -> LatencyModel:
    """T of every NPU graph from the kernels' seed latencies (ms -> s): the build's profile (ort-cpu),
    a qnn-htp bundle's device cost model, or its first-run profile on the device (never the
    simulator's timings: see `runtime.device_latency`; `kernels.latency_source` says which)."""
    profiled = kernels.latencies_ms() if kernels is not None else {}
    seeded: dict[tuple, float] = {("npu", kind, layer): ms / 1e3 for (layer, kind), ms in profiled.items()}
    tail = kernels.tail_chunk_tokens if kernels is not None else 0
    if tail:  # the tail graphs: the same work on fewer rows (measured ~linear in the rows)
        share = tail / kernels.chunk_tokens
        seeded |= {("npu", kind, layer, "rows", tail): ms / 1e3 * share for (layer, kind), ms in profiled.items()}
    return LatencyModel(seeded)


def build_dag_engine(
    resolved,
    float_engine: FloatEngine,
    kernels,
    decoder,
    *,
    policy: PolicyName | None = None,
    shadow_inputs: tuple[tuple[int, str], ...] | None = None,
    kv_scales: KVScales | None = None,
) -> DagEngine:
    """A DagEngine for `resolved` (the profile checked against device and model). `shadow_inputs`:
    the calibrated (layer, kind) shadowed inputs for the plan (default: those the kernels correct);
    `kv_scales`: an int8 KV cache's steps (None: float32)."""
    profile = resolved.profile
    chunk = profile.prefill.chunk_size
    if shadow_inputs is None and kernels is not None:
        shadow_inputs = tuple(sorted(kernels.shadowed))

    planned = resolved
    if kernels is not None and kernels.tail_chunk_tokens == 0 and profile.prefill.tail_chunk_size:
        planned = without_tail_chunks(resolved)  # kernels loaded without their tail graphs

    def plan_for(n_tokens: int):
        plan = build_plan(planned, prompt_tokens=n_tokens, calibrated_shadow_inputs=shadow_inputs)
        if kernels is not None:
            check_shadow_agreement(plan, kernels.shadowed)
            if plan.tail_chunk_size != kernels.tail_chunk_tokens:
                raise RuntimeError(f"the plan's tail chunks ({plan.tail_chunk_size} rows) differ from the "
                                   f"NPU kernels' tail graphs ({kernels.tail_chunk_tokens})")  # fmt: skip
        return plan

    head = decoder.lm_head if decoder is not None else None
    rows = decoder.tok_embd if decoder is not None else None
    prefill = DagPrefill(
        float_engine.weights, float_engine.rope, kernels, plan_for,
        chunk_tokens=chunk, policy=policy or profile.scheduler.policy, cpu_threads=resolved.cpu_threads,
        latencies=seeded_latencies(kernels), lm_head=head, embedding=rows,
        chunk_attention=profile_chunk_attention(resolved, kv_scales),
        tail_chunk_tokens=tail_chunk_tokens(planned.profile, planned.backend),
    )  # fmt: skip
    label = kernels.backend_label if kernels is not None else resolved.backend_label
    return DagEngine(float_engine, prefill, decoder, npu_label=label, kv_scales=kv_scales)


def without_tail_chunks(resolved: Resolved) -> Resolved:
    """`resolved` with `prefill.tail_chunk_size = 0`: plans of full chunks only."""
    profile = resolved.profile
    prefill = profile.prefill.model_copy(update={"tail_chunk_size": 0})
    loaded = dataclasses.replace(resolved.loaded, profile=profile.model_copy(update={"prefill": prefill}))
    return dataclasses.replace(resolved, loaded=loaded)


def limit_malloc_retention() -> bool:
    """glibc: one malloc arena for all threads and a 1 MiB trim threshold, so the executor
    threads' freed numpy temporaries go back to the OS instead of staying in per-thread arenas.
    Measured on a 1,024-token prefill of the default model: peak RSS 756 -> 649 MB, decode speed
    unchanged within noise. Returns False where it does not apply (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_arena_max = -1, -8
    return bool(mallopt(m_arena_max, 1)) and bool(mallopt(m_trim_threshold, 1 << 20))


def profile_chunk_attention(resolved, kv_scales: KVScales | None):
    """Int8ChunkAttention for `prefill.attention = "int8"` over an int8 KV cache, else None (float32)."""
    if resolved.profile.prefill.attention != "int8" or kv_scales is None or resolved.backend == "none":
        return None
    return Int8ChunkAttention(resolved.spec)


def profile_kv_scales(resolved, artifacts) -> KVScales | None:
    """The int8 KV cache steps from the artifacts' calibration, or None for `decode.kv_cache = "float32"`."""
    if resolved.profile.decode.kv_cache != "int8":
        return None
    kv = artifacts.calibration.kv_absmax
    return KVScales.from_absmax(np.array(kv.keys, np.float32), np.array(kv.values, np.float32))


def open_npu_engine(
    resolved: Resolved,
    weights: LlamaWeights,
    artifacts: Artifacts,
    decode_graphs: Path,
    *,
    decode_threads: int | None = None,
) -> DagEngine:
    """The NPU path of a resolved profile over artifacts the caller obtained (a bundle's, or a
    build's: the runtime never compiles): the graphs on the NPU backend, DAG prefill, INT8 decode
    with the graphs in `decode_graphs`. The float32 linear weights are not touched (only the rows
    of the embedding that prompts use), so they stay on disk behind the memory map.

    Decode runs on `resolved.decode_threads` (both processors' threads, capped at the cores), over
    an int8 KV cache with the calibrated steps unless `decode.kv_cache = "float32"`."""
    limit_malloc_retention()
    kernels = load_npu_kernels(resolved, artifacts, tail=True)
    float_engine = FloatEngine(weights)  # no warm_up(): it would page in every float weight
    threads = decode_threads or resolved.decode_threads
    decoder = Int8Decoder(resolved.spec, weights.tok_embd, float_engine.rope, decode_graphs, threads)
    engine = build_dag_engine(
        resolved,
        float_engine,
        kernels,
        decoder,
        shadow_inputs=tuple(artifacts.calibration.shadow_inputs),
        kv_scales=profile_kv_scales(resolved, artifacts),
    )
    engine.warm_up()
    return engine
