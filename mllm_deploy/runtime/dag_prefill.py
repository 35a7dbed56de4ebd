"""Chunked prefill that executes the plan's subgraph DAG on the NPU and CPU executors.

    prefill = DagPrefill(weights, rope, kernels, plan_for, policy="out-of-order", cpu_threads=1)
    for chunk_done, logits in prefill.run(cache, new_token_ids, cancel=cancel):
        ...   # chunks commit to the KV cache in order; the last one carries the logits [1, vocab]

The prompt (the tokens after what `cache` holds) is cut into the chunks of the plan for its
length (`plan_for(n_tokens).chunk_rows`: full chunks of `chunk_tokens`, and maybe tail chunks of
the tail graphs' static size), the last padded with PAD_TOKEN_ID rows that are never written to
the cache, attended to or returned. Every subgraph of that plan runs once: linears placed on the NPU through
`kernels.run_graph` on the NPU executor (one thread, in order); everything else (embedding,
norms, RoPE + attention over the KV cache of all earlier chunks, shadow-outlier corrections,
final norm, output head) on the CPU executor. A linear placed on the CPU (`npu_backend =
"none"`) runs in float32 numpy, exactly like the float engine.

Chunk c of layer j writes its K/V rows straight into the cache arrays (chunks overlap across
layers, so `KVCache.write`'s in-order check does not apply); a chunk is committed with
`cache.advance` only when all of its subgraphs and every earlier chunk have finished. A
cancelled or failed run commits exactly the chunks completed in order: the cache stays
consistent, and stale rows beyond `cache.length` are overwritten later.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from mllm_deploy.events import ChunkDone, SubgraphEvent, SubgraphFinished, SubgraphStarted
from mllm_deploy.forward.float_engine import PAD_TOKEN_ID, attend_stored_chunk
from mllm_deploy.forward.kv_cache import KVCache
from mllm_deploy.forward.layers import ChunkSpan, rms_norm, silu_mul_
from mllm_deploy.forward.rope import RopeTables
from mllm_deploy.model.linears import LINEAR_GROUP
from mllm_deploy.model.spec import LlamaWeights
from mllm_deploy.plan.passes import chunk_schedule
from mllm_deploy.runtime.executors import ProcessorExecutor, TaskFinished, TaskStarted
from mllm_deploy.runtime.scheduler import LatencyModel, PolicyName, Scheduler, Task, TaskGraph


@dataclass
class _Chunk:
    """Working state of one chunk. Tensors are replaced layer by layer; a linear's result is
    kept with its layer as `(layer, arrays)` until its consumers have combined it with the
    shadow correction (`final`)."""

    index: int
    span: ChunkSpan
    ids: np.ndarray  # [T] int64, padded
    remaining: int  # subgraphs not finished
    residual: np.ndarray | None = None  # [T, hidden]
    x_norm: np.ndarray | None = None  # [T, hidden]
    attn: np.ndarray | None = None  # [T, q_dim]
    out: dict = field(default_factory=dict)  # linear kind -> (layer, [arrays]) from the linear
    correction: dict = field(default_factory=dict)  # linear kind -> (layer, [arrays]) from its shadow
    final: dict = field(default_factory=dict)  # linear kind -> (layer, [arrays]) out + correction
    normed_last: np.ndarray | None = None  # [1, hidden] after the final norm
    logits: np.ndarray | None = None  # [1, vocab]
    first_start: float | None = None
    last_end: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class PrefillStats:
    """Measured figures of the last run."""

    seconds: float = 0.0
    busy_seconds: dict = field(default_factory=dict)  # processor -> summed task time
    tasks: int = 0
    spans: list = field(default_factory=list)  # SubgraphFinished events, in finish order


class DagPrefill:
    """Runs the plan DAG of one prefill on persistent NPU/CPU executors."""

    def __init__(
        self,
        weights: LlamaWeights,
        rope: RopeTables,
        kernels,  # NpuLayerKernels, or None when nothing is placed on the NPU
        plan_for: Callable[[int], object],  # prompt tokens -> Plan
        *,
        chunk_tokens: int,
        policy: PolicyName = "out-of-order",
        cpu_threads: int = 1,
        latencies: LatencyModel | None = None,
        lm_head: Callable[[np.ndarray], np.ndarray] | None = None,  # [1, hidden] -> [1, vocab]
        embedding=None,  # indexable like tok_embd (e.g. file_rows.FileRows)
        chunk_attention=None,  # Int8ChunkAttention over an int8 KV cache, or None: float32 attention
        tail_chunk_tokens: int = 0,  # rows of the plans' tail chunks (Plan.tail_chunk_size), or 0: none
    ):
        self.weights = weights
        self.spec = weights.spec
        self.rope = rope
        self.kernels = kernels
        self.plan_for = plan_for
        self.chunk_tokens = chunk_tokens
        self.tail_chunk_tokens = tail_chunk_tokens
        self.policy = policy
        self.cpu_threads = cpu_threads
        self.latencies = latencies or LatencyModel()
        self.lm_head = lm_head or (lambda x: x @ weights.output.T)
        self.embedding = embedding if embedding is not None else weights.tok_embd  # rows by id: [T] -> [T, hidden]
        self.chunk_attention = chunk_attention
        self.executors = {"npu": ProcessorExecutor("npu", 1), "cpu": ProcessorExecutor("cpu", cpu_threads)}
        self.on_event: Callable[[SubgraphEvent], None] | None = None
        self.last = PrefillStats()
        self._graphs: dict[tuple[int, ...], TaskGraph] = {}  # chunk rows -> DAG, one plan per layout

    @property
    def blas_threads(self) -> int:
        """BLAS threads per CPU task. Out-of-order runs up to `cpu_threads` CPU tasks at once,
        each on one BLAS thread (OpenBLAS threads that outnumber the cores spin and thrash);
        sequential runs one CPU task at a time, which may use all `cpu_threads`."""
        return self.cpu_threads if self.policy == "sequential" else 1

    def close(self) -> None:
        for executor in self.executors.values():
            executor.shutdown()

    def graph(self, n_tokens: int) -> TaskGraph:
        """The DAG of a prompt of `n_tokens`: planned once per chunk layout (a plan of a 4,096-token
        prompt takes ~0.2 s to build, too long to pay again for every prompt length)."""
        rows = self.chunk_rows(n_tokens)
        if rows not in self._graphs:
            plan = self.plan_for(n_tokens)
            if tuple(plan.chunk_rows) != rows:  # type: ignore[attr-defined]
                raise RuntimeError(f"the plan cuts {n_tokens} tokens into {plan.chunk_rows}, not {list(rows)}")  # type: ignore[attr-defined]
            self._graphs[rows] = TaskGraph.from_plan(plan)
        return self._graphs[rows]

    def chunk_rows(self, n_tokens: int) -> tuple[int, ...]:
        """Static rows of each chunk of a prompt of `n_tokens`, by the plan's rule (`chunk_schedule`)."""
        return tuple(chunk_schedule(n_tokens, self.chunk_tokens, self.tail_chunk_tokens)[0])

    # -- the run --------------------------------------------------------------------------

    def run(
        self, cache: KVCache, token_ids: Sequence[int], *, cancel: threading.Event | None = None
    ) -> Iterator[tuple[ChunkDone, np.ndarray | None]]:
        """Prefill `token_ids` after what `cache` holds; yields each chunk as it commits."""
        n = len(token_ids)
        if n < 1:
            raise ValueError("nothing to prefill")
        if cache.length + n > cache.capacity:
            raise ValueError(f"{n} tokens do not fit the KV cache ({cache.free} free)")
        cache.reserve(cache.length + n)  # before any task writes into the buffers
        rows = self.chunk_rows(n)
        graph = self.graph(n)
        start0 = cache.length
        self.rope.ensure(start0 + sum(rows))
        per_chunk: dict[int, int] = {}
        for task in graph.tasks.values():
            per_chunk[task.chunk] = per_chunk.get(task.chunk, 0) + 1
        chunks = []
        offset = 0
        for c, size in enumerate(rows):
            real = list(token_ids[offset : offset + size])
            ids = np.full(size, PAD_TOKEN_ID, np.int64)
            ids[: len(real)] = real
            span = ChunkSpan(start=start0 + offset, n_real=len(real), n_rows=size)
            chunks.append(_Chunk(c, span, ids, per_chunk[c]))
            offset += size
        yield from self._dispatch(graph, chunks, cache, cancel)

    def _dispatch(self, graph: TaskGraph, chunks: list[_Chunk], cache: KVCache, cancel) -> Iterator:
        sched = Scheduler(graph, self.policy, self.latencies)
        completions: queue.Queue = queue.Queue()
        free = {p: ex.threads for p, ex in self.executors.items()}
        stats = PrefillStats(busy_seconds=dict.fromkeys(self.executors, 0.0))
        self.last = stats
        committed = 0
        error: BaseException | None = None
        stopping = False
        started = time.perf_counter()
        limits = threadpool_limits(limits=self.blas_threads, user_api="blas")
        try:
            while not sched.done:
                if not stopping:
                    for p in free:
                        while free[p] > 0:
                            tid = sched.pick(p)
                            if tid is None:
                                break
                            sched.started(tid)
                            free[p] -= 1
                            task = graph.tasks[tid]
                            self.executors[p].submit(tid, self._work(task, chunks[task.chunk], cache), completions)
                if not sched.running:
                    if stopping:
                        break
                    raise RuntimeError("prefill DAG stalled: nothing running and nothing ready")
                msg = completions.get()
                task = graph.tasks[msg.task_id]
                if isinstance(msg, TaskStarted):
                    self._emit(SubgraphStarted(task.id, task.processor, task.chunk, task.layer, task.kind, msg.t_start))
                    continue
                assert isinstance(msg, TaskFinished)
                sched.finished(task.id)
                free[task.processor] += 1
                finished = SubgraphFinished(
                    task.id, task.processor, task.chunk, task.layer, task.kind, msg.t_start, msg.t_end
                )
                stats.spans.append(finished)
                stats.busy_seconds[task.processor] += msg.t_end - msg.t_start
                stats.tasks += 1
                self._emit(finished)
                if msg.error is not None:
                    error = error or msg.error
                    stopping = True
                    continue
                self.latencies.observe(task, msg.t_end - msg.t_start)
                chunk = chunks[task.chunk]
                chunk.first_start = msg.t_start if chunk.first_start is None else min(chunk.first_start, msg.t_start)
                chunk.last_end = max(chunk.last_end, msg.t_end)
                chunk.remaining -= 1
                while committed < len(chunks) and chunks[committed].remaining == 0:
                    done = chunks[committed]
                    cache.advance([int(t) for t in done.ids[: done.span.n_real]])
                    committed += 1
                    logits = done.logits
                    _release(done)
                    event = ChunkDone(
                        done.index, len(chunks), done.span.n_real, done.last_end - (done.first_start or done.last_end)
                    )
                    yield event, logits
                if cancel is not None and cancel.is_set():
                    stopping = True
        finally:
            while sched.running:  # let running work finish before anyone touches the cache again
                msg = completions.get()
                if isinstance(msg, TaskFinished):
                    sched.finished(msg.task_id)
            limits.restore_original_limits()
            stats.seconds = time.perf_counter() - started
        if error is not None:
            raise error

    def _emit(self, event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    # -- the work of each subgraph kind -------------------------------------------------------

    def _work(self, task: Task, chunk: _Chunk, cache: KVCache) -> Callable[[], None]:
        kind, layer = task.kind, task.layer
        if kind == "shadow":
            linear = task.id.split(".")[-2]
            return lambda: self._shadow(chunk, layer, linear)
        if kind in LINEAR_GROUP:
            if task.processor == "npu":
                return lambda: self._npu_linear(chunk, layer, kind)
            return lambda: self._cpu_linear(chunk, layer, kind)
        return {
            "embed": lambda: self._embed(chunk),
            "attn_norm": lambda: self._attn_norm(chunk, layer),
            "attention": lambda: self._attention(chunk, layer, cache),
            "ffn_norm": lambda: self._ffn_norm(chunk, layer),
            "final_norm": lambda: self._final_norm(chunk, layer),
            "lm_head": lambda: self._lm_head(chunk),
        }[kind]

    def _linear_input(self, chunk: _Chunk, layer: int, kind: str) -> np.ndarray:
        name = LINEAR_GROUP[kind].graph_input
        if name == LINEAR_GROUP["down"].graph_input:  # the MLP activation: the combined gate_up result
            return self._final(chunk, layer, "gate_up")[0]
        x = chunk.x_norm if name == LINEAR_GROUP["qkv"].graph_input else chunk.attn
        assert x is not None  # the DAG runs a linear only after the subgraph that produces its input
        return x

    def _final(self, chunk: _Chunk, layer: int, kind: str) -> list[np.ndarray]:
        """The linear's output plus its shadow correction (if any), combined once."""
        with chunk.lock:
            have = chunk.final.get(kind)
            if have is not None and have[0] == layer:
                return have[1]
            out_layer, arrays = chunk.out.pop(kind)
            if out_layer != layer:
                raise RuntimeError(f"chunk {chunk.index}: {kind} of layer {out_layer} where layer {layer} was expected")
            corr = chunk.correction.pop(kind, None)
            if corr is not None and corr[0] != layer:
                raise RuntimeError(f"chunk {chunk.index}: stale {kind} correction of layer {corr[0]}")
            combine = getattr(self.kernels, "combine", None)
            if combine is not None and (layer, kind) in self.kernels.shadowed:
                # the kernels know how their outputs take a correction (gate_up: add, then silu·mul)
                arrays = combine(layer, kind, arrays, corr[1] if corr is not None else None)
            elif corr is not None:
                arrays = [a + d for a, d in zip(arrays, corr[1], strict=True)]
            chunk.final[kind] = (layer, arrays)
            return arrays

    def _embed(self, chunk: _Chunk) -> None:
        chunk.residual = np.array(self.embedding[chunk.ids], dtype=np.float32)  # [T, hidden]

    def _attn_norm(self, chunk: _Chunk, layer: int) -> None:
        if layer > 0:
            chunk.residual = chunk.residual + self._final(chunk, layer - 1, "down")[0]
        assert chunk.residual is not None  # set by the embedding, the chunk's first subgraph
        chunk.x_norm = rms_norm(chunk.residual, self.weights.layers[layer].attn_norm, self.spec.rms_eps)

    def _ffn_norm(self, chunk: _Chunk, layer: int) -> None:
        chunk.residual = chunk.residual + self._final(chunk, layer, "o_proj")[0]
        chunk.x_norm = rms_norm(chunk.residual, self.weights.layers[layer].ffn_norm, self.spec.rms_eps)

    def _npu_linear(self, chunk: _Chunk, layer: int, kind: str) -> None:
        x = self._linear_input(chunk, layer, kind)  # [T, in]
        chunk.out[kind] = (layer, list(self.kernels.run_graph(layer, kind, x)))

    def _cpu_linear(self, chunk: _Chunk, layer: int, kind: str) -> None:
        """float32 numpy, the same operations as FloatBlockLinears."""
        w = self.weights.layers[layer]
        x = self._linear_input(chunk, layer, kind)
        if kind == "qkv":
            outs = [x @ w.wq.T, x @ w.wk.T, x @ w.wv.T]  # [T, q_dim], [T, kv_dim] x2
            for y, b in zip(outs, (w.bq, w.bk, w.bv), strict=True):
                if b is not None:
                    y += b
        elif kind == "o_proj":
            outs = [x @ w.wo.T]  # [T, hidden]
        elif kind == "gate_up":
            outs = [silu_mul_(x @ w.w_gate.T, x @ w.w_up.T)]  # [T, ffn]
        else:
            outs = [x @ w.w_down.T]  # [T, hidden]
        chunk.out[kind] = (layer, outs)

    def _shadow(self, chunk: _Chunk, layer: int, kind: str) -> None:
        x = self._linear_input(chunk, layer, kind)
        correction = self.kernels.shadow(layer, kind, x)
        if correction is not None:
            chunk.correction[kind] = (layer, correction)

    def _attention(self, chunk: _Chunk, layer: int, cache: KVCache) -> None:
        spec, span = self.spec, chunk.span
        q, k, v = self._final(chunk, layer, "qkv")
        rows = q.shape[0]
        q = self.rope.apply(q.reshape(rows, spec.n_heads, spec.head_dim), span.start)
        k = self.rope.apply(k.reshape(rows, spec.n_kv_heads, spec.head_dim), span.start)
        v = v.reshape(rows, spec.n_kv_heads, spec.head_dim)
        # only real rows reach the cache; not cache.write(): chunks of different layers interleave
        cache.store(layer, span.start, k[: span.n_real], v[: span.n_real])
        chunk.attn = attend_stored_chunk(
            q, k, v, span, cache, layer, spec.n_kv_heads, self.chunk_attention
        )  # [T, q_dim]

    def _final_norm(self, chunk: _Chunk, layer: int) -> None:
        last = chunk.span.n_real - 1
        down = self._final(chunk, layer - 1, "down")[0]
        assert chunk.residual is not None  # set by the embedding, the chunk's first subgraph
        x = chunk.residual[last : last + 1] + down[last : last + 1]  # [1, hidden]
        chunk.normed_last = rms_norm(x, self.weights.output_norm, self.spec.rms_eps)

    def _lm_head(self, chunk: _Chunk) -> None:
        assert chunk.normed_last is not None  # the head runs after the final norm
        chunk.logits = self.lm_head(chunk.normed_last)  # [1, vocab]


def _release(chunk: _Chunk) -> None:
    """Drop a committed chunk's working tensors (its K/V live on in the cache)."""
    chunk.residual = chunk.x_norm = chunk.attn = chunk.normed_last = chunk.logits = None
    chunk.out.clear()
    chunk.correction.clear()
    chunk.final.clear()
