"""Drive one turn of a session the way every headless front end does: Ctrl-C cancels it cleanly,
text streams to a callback, every event can be observed (a trace recorder, the bench)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from mllm_deploy.events import GenerationDone, TokenEmitted
from mllm_deploy.runtime.interrupt import sigint_cancels

Turn = Callable[[threading.Event], Iterable[object]]


def run_turn(
    turn: Turn, on_text: Callable[[str], None] | None, on_event: Callable[[object], None] | None = None
) -> GenerationDone:
    """Run `turn(cancel)` to its end with Ctrl-C mapped to `cancel`; stream text to `on_text`;
    every event also goes to `on_event`. Returns the turn's GenerationDone (always its last event)."""
    cancel = threading.Event()
    done = None
    with sigint_cancels(cancel):
        for event in turn(cancel):
            if on_event is not None:
                on_event(event)
            if isinstance(event, TokenEmitted) and on_text is not None and event.text:
                on_text(event.text)
            elif isinstance(event, GenerationDone):
                done = event
    if done is None:
        raise RuntimeError("a generation ended without its GenerationDone event")
    return done
