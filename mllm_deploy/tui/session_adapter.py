"""What the UI needs from a chat session beyond a turn, through the engine's interface. No textual here.

- `switch_profile`: apply a re-validated profile (decode.*, system prompt, ...) to a live
  session without dropping its KV cache (`ChatSession.update_profile`).
- `prefill_context`: put a document into the KV cache without a reply: one turn of
  `reply_to` with a single generated token (no decode step runs) whose text is ignored.
- `SubgraphRelay` / `relay_subgraph_events`: the NPU path's SubgraphStarted/Finished events
  as they happen (the session's event stream only releases them at each chunk commit), in
  batches so thousands of subgraphs per second do not flood the UI.
- `executor_slots`: how many subgraphs each processor runs at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from mllm_deploy.interface.session import ChatSession, LoadedModel
from mllm_deploy.profile import LoadedProfile


def switch_profile(session: ChatSession, loaded_profile: LoadedProfile) -> None:
    session.update_profile(loaded_profile)


def prefill_context(session: ChatSession, context_message: str, cancel: threading.Event) -> Iterator[object]:
    """Events of prefilling the conversation so far plus a user message holding `context_message`."""
    conversation = [*session.messages, {"role": "user", "content": context_message}]
    return session.reply_to(conversation, cancel=cancel, max_new_tokens=1)


class SubgraphRelay:
    """Collects subgraph events (called on the prefill's dispatch thread) and hands them on in
    batches at most every `interval` seconds; `flush()` hands on the rest."""

    def __init__(self, post_batch: Callable[[list], object], interval: float = 0.05):
        self.post_batch = post_batch
        self.interval = interval
        self._buffer: list = []
        self._last = time.perf_counter()

    def __call__(self, event) -> None:
        self._buffer.append(event)
        if time.perf_counter() - self._last >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            batch, self._buffer = self._buffer, []
            self.post_batch(batch)
        self._last = time.perf_counter()


def relay_subgraph_events(session: ChatSession, relay: SubgraphRelay) -> Callable[[], None]:
    """Route the engine's subgraph events to `relay` live; returns the function that undoes it.

    Without an NPU path (the float engine) there is nothing to route and nothing changes."""
    undo = session.model.engine.route_subgraph_events(relay)

    def restore() -> None:
        relay.flush()
        undo()

    return restore


def executor_slots(model: LoadedModel) -> dict[str, int]:
    """Subgraphs each processor runs at once (both lanes shown; the float engine runs one
    synchronous CPU executor)."""
    return {"npu": 1, "cpu": 1} | {name: max(1, n) for name, n in model.engine.executor_slots().items()}


def close_engine(model: LoadedModel | None) -> None:
    """Stop an engine's executor threads (the NPU path) before its model is dropped (None: no
    model was loaded)."""
    if model is not None:
        model.engine.close()
