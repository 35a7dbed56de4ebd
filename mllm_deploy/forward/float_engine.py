"""numpy float32 forward of a Llama-family decoder over a KV cache: chunked prefill and decode.

The engine is stateless apart from its weights; a conversation's state is its `KVCache`.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from mllm_deploy.events import ChunkDone, SubgraphEvent
from mllm_deploy.forward.family import float_block_linears, head_rms_norm, sliding_window_attention
from mllm_deploy.forward.kv_cache import KVCache, KVScales
from mllm_deploy.forward.layers import (
    BlockLinears,
    ChunkSpan,
    causal_attention,
    rms_norm,
)
from mllm_deploy.forward.rope import RopeTables
from mllm_deploy.model.spec import LlamaWeights, ModelSpec

LogitRows = Literal["last", "all", "none"]
PAD_TOKEN_ID = 0  # fills padded chunk rows; its results are discarded
FLOAT_ENGINE_NAME = "cpu-float32-numpy"  # what runs for npu_backend = "none"


class ChunkAttention(Protocol):
    """Attention of a chunk over an int8 KV cache in integer kernels (`runtime.attention_int8`):
    q [T, heads, head_dim] against the cache's positions before `start` and the chunk's own K/V
    rows; returns [T, heads * head_dim]."""

    def __call__(
        self, q: np.ndarray, cache: KVCache, layer: int, start: int, own_keys: np.ndarray, own_values: np.ndarray
    ) -> np.ndarray: ...


@dataclass
class PrefillResult:
    logits: np.ndarray | None  # [1, vocab] ("last"), [prefilled tokens, vocab] ("all"), or None
    tokens: int  # real tokens committed to the cache
    chunks: int  # chunks run
    cancelled: bool


def attend_stored_chunk(
    q, k, v, span: ChunkSpan, cache: KVCache, layer: int, n_kv_heads: int, chunk_attention: ChunkAttention | None = None
) -> np.ndarray:
    """Attention of a chunk whose real K/V rows `k`/`v` [T, kv_heads, head_dim] the cache already
    holds at `span.start`: integer kernels over the earlier chunks of an int8 cache when
    `chunk_attention` is given (`prefill.attention = "int8"`), else float32 over
    `cache.attention_window`; the chunk's own rows are attended in float32 either way. q [T, heads,
    head_dim] rotated; returns [T, heads * head_dim]."""
    if chunk_attention is not None and cache.scales is not None:
        return chunk_attention(q, cache, layer, span.start, k[: span.n_real], v[: span.n_real])
    keys, values = cache.attention_window(
        layer, span.start, k[: span.n_real], v[: span.n_real]
    )  # [kv_heads, end, head_dim]
    return causal_attention(q, keys, values, span.start, n_kv_heads)


class FloatEngine:
    """Runs a model's blocks in float32 with numpy; `block_linears` can be replaced per layer."""

    def __init__(self, weights: LlamaWeights):
        spec = weights.spec
        if spec.n_heads % spec.n_kv_heads:
            raise ValueError(f"n_heads {spec.n_heads} is not a multiple of n_kv_heads {spec.n_kv_heads}")
        self.spec: ModelSpec = spec
        self.weights = weights
        self.rope = RopeTables(spec.head_dim, spec.rope_theta, spec.rope_style, n_positions=1024)
        self.local_rope = (  # "local" (sliding-window) layers' own RoPE base (Gemma 3)
            RopeTables(spec.head_dim, spec.local_rope_theta, spec.rope_style, n_positions=1024)
            if spec.local_rope_theta is not None
            else self.rope
        )
        self.block_linears: list[BlockLinears] = [
            float_block_linears(layer, spec.activation) for layer in weights.layers
        ]
        self.chunk_attention: ChunkAttention | None = None  # attend int8 caches in integer kernels (NPU path)
        self.cancel: threading.Event | None = None  # not checked inside a chunk: the float engine has no subgraphs

    # -- the runtime's Engine interface (runtime.engine) -------------------------------------

    static_chunk_tokens: int | None = None  # any chunk size works in float

    def drain_events(self) -> list[SubgraphEvent]:
        return []  # no subgraphs, no subgraph events

    def describe(self) -> dict[str, str]:
        return {"npu": "none", "prefill": FLOAT_ENGINE_NAME, "attention": "float32", "decode": FLOAT_ENGINE_NAME}

    def executor_slots(self) -> dict[str, int]:
        return {"cpu": 1}  # computes synchronously on the calling thread (numpy's BLAS threads inside)

    def route_subgraph_events(self, sink: Callable[[SubgraphEvent], None]) -> Callable[[], None]:
        return lambda: None  # no subgraphs: nothing to route

    def close(self) -> None:
        pass  # no threads of its own

    def with_linears(
        self, block_linears: Sequence[BlockLinears], chunk_attention: ChunkAttention | None = None
    ) -> FloatEngine:
        """An engine over the same weights and RoPE tables whose blocks run `block_linears` (one per
        layer: NPU graphs, recording or probing linears) and, when given, int8 `chunk_attention`."""
        if len(block_linears) != self.spec.n_layers:
            raise ValueError(f"{len(block_linears)} block linears for {self.spec.n_layers} layers")
        engine = copy.copy(self)  # shares weights and rope; the two attributes below are its own
        engine.block_linears = list(block_linears)
        engine.chunk_attention = chunk_attention if chunk_attention is not None else self.chunk_attention
        return engine

    def warm_up(self) -> None:
        """Make the weights resident (they may be memory-mapped from the weight cache) and start
        the BLAS threads, so the first prompt is not charged for page faults."""
        arrays = [self.weights.tok_embd, self.weights.output, self.weights.output_norm]
        for layer in self.weights.layers:
            arrays += [a for a in vars(layer).values() if isinstance(a, np.ndarray)]
        for array in arrays:
            flat = array.reshape(-1)
            float(flat[:: max(1, 4096 // flat.itemsize)].sum())  # one read per page
        self.forward_chunk(self.new_cache(2), [0, 0], logit_rows="last")

    # -- state ---------------------------------------------------------------------------

    def new_cache(self, capacity: int, scales: KVScales | None = None) -> KVCache:
        """An empty KV cache for this model: float32, or int8 with `scales` (the NPU path's)."""
        spec = self.spec
        self.rope.ensure(capacity)
        return KVCache(spec.n_layers, capacity, spec.n_kv_heads, spec.head_dim, scales=scales)

    # -- the three steps of a block --------------------------------------------------------

    def qkv_step(self, layer: int, x: np.ndarray):
        """x [T, hidden] -> q [T, q_dim], k [T, kv_dim], v [T, kv_dim]."""
        x_norm = rms_norm(x, self.weights.layers[layer].attn_norm, self.spec.rms_eps)
        return self.block_linears[layer].qkv(x_norm)

    def attention_step(self, layer: int, q, k, v, span: ChunkSpan, cache: KVCache) -> np.ndarray:
        """Rotate q/k, store the real rows' k/v in the cache, attend. Returns [T, q_dim]."""
        spec = self.spec
        n_rows = q.shape[0]
        q = q.reshape(n_rows, spec.n_heads, spec.head_dim)
        k = k.reshape(n_rows, spec.n_kv_heads, spec.head_dim)
        w = self.weights.layers[layer]
        if w.q_norm is not None and w.k_norm is not None:  # QK-norm (Gemma 3), before RoPE
            q, k = head_rms_norm(q, w.q_norm, spec.rms_eps), head_rms_norm(k, w.k_norm, spec.rms_eps)
        if spec.attention_scale is not None:  # attention divides by sqrt(head_dim): make it this scale
            q = q * np.float32(spec.attention_scale * np.sqrt(spec.head_dim))
        local = spec.layer_kind(layer) == "local"
        rope = self.local_rope if local else self.rope
        q, k = rope.apply(q, span.start), rope.apply(k, span.start)
        v = v.reshape(n_rows, spec.n_kv_heads, spec.head_dim)
        cache.write(layer, span.start, k[: span.n_real], v[: span.n_real])
        if local and spec.sliding_window is not None:
            if self.chunk_attention is not None and cache.scales is not None:
                raise NotImplementedError("sliding-window layers over an int8 KV cache")
            keys, values = cache.attention_window(layer, span.start, k[: span.n_real], v[: span.n_real])
            return sliding_window_attention(q, keys, values, span.start, spec.n_kv_heads, spec.sliding_window)
        return attend_stored_chunk(q, k, v, span, cache, layer, spec.n_kv_heads, self.chunk_attention)

    def out_mlp_step(self, layer: int, x: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """Residual stream after the block: x + wo(attn), then + mlp(norm(.)). [T, hidden]."""
        linears, w, eps = self.block_linears[layer], self.weights.layers[layer], self.spec.rms_eps
        out = linears.attn_output(attn)
        if w.post_attn_norm is not None:  # sandwich norms (Gemma 2/3)
            out = rms_norm(out, w.post_attn_norm, eps)
        h = x + out
        mlp = linears.mlp(rms_norm(h, w.ffn_norm, eps))
        if w.post_ffn_norm is not None:
            mlp = rms_norm(mlp, w.post_ffn_norm, eps)
        return h + mlp

    def block(self, layer: int, x: np.ndarray, span: ChunkSpan, cache: KVCache) -> np.ndarray:
        q, k, v = self.qkv_step(layer, x)
        attn = self.attention_step(layer, q, k, v, span, cache)
        return self.out_mlp_step(layer, x, attn)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Output head on x [n, hidden] -> [n, vocab]."""
        x_norm = rms_norm(x, self.weights.output_norm, self.spec.rms_eps)
        logits = x_norm @ self.weights.output.T
        cap = self.spec.final_logit_softcap
        if cap is not None:  # cap * tanh(logits / cap)
            logits = np.float32(cap) * np.tanh(logits / np.float32(cap))
        return logits

    # -- whole chunks ------------------------------------------------------------------------

    def forward_chunk(
        self, cache: KVCache, token_ids: Sequence[int], *, n_rows: int | None = None, logit_rows: LogitRows = "last"
    ) -> np.ndarray | None:
        """Run `token_ids` (padded to `n_rows` rows) after what the cache holds, then commit them.

        Returns logits for the last real token [1, vocab], every real token [n, vocab], or None.
        """
        n_real = len(token_ids)
        n_rows = n_real if n_rows is None else n_rows
        if not 1 <= n_real <= n_rows:
            raise ValueError(f"a chunk needs 1..{n_rows} real tokens, got {n_real}")
        if cache.length + n_real > cache.capacity:
            raise ValueError(f"{n_real} tokens do not fit the KV cache ({cache.free} free)")
        span = ChunkSpan(start=cache.length, n_real=n_real, n_rows=n_rows)
        self.rope.ensure(span.start + n_rows)
        self.local_rope.ensure(span.start + n_rows)
        ids = np.full(n_rows, PAD_TOKEN_ID, np.int64)
        ids[:n_real] = token_ids
        x = self.weights.tok_embd[ids]  # [T, hidden]
        if self.spec.embedding_scale != 1.0:  # Gemma: * sqrt(hidden)
            x = x * np.float32(self.spec.embedding_scale)
        for layer in range(self.spec.n_layers):
            x = self.block(layer, x, span, cache)
        cache.advance(list(token_ids))
        if logit_rows == "none":
            return None
        rows = x[n_real - 1 : n_real] if logit_rows == "last" else x[:n_real]
        return self.logits(rows)

    def prefill_chunks(
        self,
        cache: KVCache,
        token_ids: Sequence[int],
        *,
        chunk_size: int,
        pad_last_chunk: bool = False,
        logit_rows: LogitRows = "last",
    ) -> Iterator[tuple[ChunkDone, np.ndarray | None]]:
        """Feed `token_ids` in chunks of `chunk_size`, yielding after each chunk its event and
        logits ("all": the chunk's real rows; "last": only after the final chunk; else None).

        With `pad_last_chunk` every chunk has exactly `chunk_size` rows (as a static-shape
        NPU graph needs); the padding is neither cached nor attended to. Stopping the
        iteration between chunks leaves the cache holding exactly the chunks done.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        n_chunks = -(-len(token_ids) // chunk_size)
        for index in range(n_chunks):
            started = time.perf_counter()
            chunk = list(token_ids[index * chunk_size : (index + 1) * chunk_size])
            n_rows = chunk_size if pad_last_chunk else len(chunk)
            rows: LogitRows = logit_rows if (logit_rows == "all" or index == n_chunks - 1) else "none"
            logits = self.forward_chunk(cache, chunk, n_rows=n_rows, logit_rows=rows)
            yield ChunkDone(index, n_chunks, len(chunk), time.perf_counter() - started), logits

    def prefill(
        self,
        cache: KVCache,
        token_ids: Sequence[int],
        *,
        chunk_size: int,
        pad_last_chunk: bool = False,
        logit_rows: LogitRows = "last",
        cancel: threading.Event | None = None,
        on_chunk: Callable[[ChunkDone], None] | None = None,
    ) -> PrefillResult:
        """`prefill_chunks` run to the end; `cancel` is checked before each chunk."""
        pieces: list[np.ndarray] = []
        done = chunks = 0
        for event, logits in self.prefill_chunks(
            cache, token_ids, chunk_size=chunk_size, pad_last_chunk=pad_last_chunk, logit_rows=logit_rows
        ):
            done += event.tokens
            chunks += 1
            if logits is not None:
                pieces.append(logits)
            if on_chunk is not None:
                on_chunk(event)
            if cancel is not None and cancel.is_set() and done < len(token_ids):
                return PrefillResult(None, done, chunks, cancelled=True)
        logits = np.concatenate(pieces) if pieces else None
        return PrefillResult(logits, done, chunks, cancelled=False)

    def decode_step(self, cache: KVCache, token_id: int) -> np.ndarray:
        """Append one token and return the next-token logits [vocab]."""
        logits = self.forward_chunk(cache, [int(token_id)], logit_rows="last")
        assert logits is not None  # "last" always returns the last token's logits
        return logits[0]
