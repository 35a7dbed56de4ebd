"""The one interface every engine offers: what `generate()`, sessions, the bench and front ends drive.

Two implementations: the float32 engine (`forward.FloatEngine`, the baseline and `npu_backend =
"none"`) and the NPU path (`dag_engine.DagEngine`: DAG prefill on the executors, INT8 decode).
Front ends never probe an engine's attributes; they use this.

    cache = engine.new_cache(capacity)                                # [layers, kv_heads, positions, head_dim]
    for done, logits in engine.prefill_chunks(cache, ids, chunk_size=engine.static_chunk_tokens or n):
        ...
    logits = engine.decode_step(cache, token_id)                      # [vocab]
    cache.reset()                                                     # forget a conversation
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from mllm_deploy.events import ChunkDone, Event, SubgraphEvent, TurnEvent
from mllm_deploy.forward.float_engine import LogitRows
from mllm_deploy.forward.kv_cache import KVCache
from mllm_deploy.model.spec import ModelSpec


class Engine(Protocol):
    """A model ready to prefill and decode over KV caches it creates."""

    spec: ModelSpec
    cancel: threading.Event | None
    """Checked between subgraphs during a prefill (the NPU path); None: not cancellable inside."""

    @property
    def static_chunk_tokens(self) -> int | None:
        """Rows of every prefill chunk when the engine runs static-shape graphs (chunks are padded
        to it); None when any chunk size works."""
        ...

    def new_cache(self, capacity: int) -> KVCache:
        """An empty KV cache in the storage this engine attends (float32, or int8 with its steps)."""
        ...

    def prefill_chunks(
        self,
        cache: KVCache,
        token_ids: Sequence[int],
        *,
        chunk_size: int,
        pad_last_chunk: bool = False,
        logit_rows: LogitRows = "last",
    ) -> Iterator[tuple[ChunkDone, np.ndarray | None]]:
        """Feed `token_ids` after what `cache` holds, chunk by chunk, yielding each chunk's event and
        logits (the last token's [1, vocab] after the final chunk)."""
        ...

    def decode_step(self, cache: KVCache, token_id: int) -> np.ndarray:
        """Append one token and return the next-token logits [vocab]."""
        ...

    def drain_events(self) -> list[SubgraphEvent]:
        """Subgraph events collected since the last call (SubgraphStarted/Finished); none on the
        float engine, which runs no subgraphs."""
        ...

    def describe(self) -> dict[str, str]:
        """What really runs, for reports and the bench's `backend`: npu, prefill, attention, decode."""
        ...

    def route_subgraph_events(self, sink: Callable[[SubgraphEvent], None]) -> Callable[[], None]:
        """Send subgraph events to `sink` live (a UI's relay) instead of `drain_events`; returns
        the function that undoes it (a no-op on the float engine)."""
        ...

    def executor_slots(self) -> dict[str, int]:
        """Subgraphs each processor runs at once (the float engine: one synchronous CPU)."""
        ...

    def warm_up(self) -> None:
        """Touch everything once, so the first prompt is not charged for it."""
        ...

    def close(self) -> None:
        """Stop executor threads (nothing to stop on the float engine)."""
        ...


def with_subgraph_events(events: Iterator[Event], engine: Engine) -> Iterator[TurnEvent]:
    """`events` with the engine's pending subgraph events placed before each event."""
    for event in events:
        yield from engine.drain_events()
        yield event
