"""What the UI needs from a chat session that the runtime does not offer (yet). No textual here.

- `switch_profile`: apply a re-validated profile (decode.*, system prompt, ...) to a live
  session without dropping its KV cache (`ChatSession.update_profile` when present).
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


def switch_profile(session, loaded_profile) -> None:
    update = getattr(session, "update_profile", None)
    if callable(update):
        update(loaded_profile)
        return
    session.profile = loaded_profile.profile
    session._locate = loaded_profile.where


def prefill_context(session, context_message: str, cancel: threading.Event) -> Iterator[object]:
    """Events of prefilling the conversation so far plus a user message holding `context_message`."""
    conversation = [*session.messages, {"role": "user", "content": context_message}]
    return session.reply_to(conversation, cancel=cancel, max_new_tokens=1)


class SubgraphRelay:
    """Collects subgraph events (called on the prefill's dispatch thread) and hands them on in
    batches at most every `interval` seconds; `flush()` hands on the rest."""

    def __init__(self, post_batch: Callable[[list], None], interval: float = 0.05):
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


def relay_subgraph_events(session, relay: SubgraphRelay) -> Callable[[], None]:
    """Route the engine's subgraph events to `relay` live; returns the function that undoes it.

    Without an NPU path (the float engine) there is nothing to route and nothing changes."""
    prefill = getattr(getattr(session.model, "engine", None), "prefill", None)
    if prefill is None or not hasattr(prefill, "on_event"):
        return lambda: None
    previous = prefill.on_event
    prefill.on_event = relay

    def restore() -> None:
        relay.flush()
        prefill.on_event = previous

    return restore


def executor_slots(model, resolved) -> dict[str, int]:
    """Subgraphs each processor runs at once: the engine's executors when it has them."""
    executors = getattr(getattr(getattr(model, "engine", None), "prefill", None), "executors", None)
    if isinstance(executors, dict) and executors:
        return {name: max(1, int(getattr(ex, "threads", 1))) for name, ex in executors.items()}
    return {"npu": 1, "cpu": 1}  # the float engine: one synchronous executor


def close_engine(model) -> None:
    """Stop an engine's executor threads (the NPU path) before its model is dropped."""
    close = getattr(getattr(model, "engine", None), "close", None)
    if callable(close):
        close()
