"""Messages that inference workers post to the app (workers never touch widgets)."""

from __future__ import annotations

import time
from typing import Literal

from textual.app import App
from textual.message import Message

from mllm_deploy.interface.session import ChatSession, LoadedModel
from mllm_deploy.runtime.telemetry import TimedEvent

WorkKind = Literal["turn", "document"]


class ModelReady(Message):
    """The model is loaded and a chat session over it exists."""

    def __init__(self, model: LoadedModel, session: ChatSession, reason: str) -> None:
        super().__init__()
        self.model = model
        self.session = session
        self.reason = reason  # "start", "/set ...", ...


class LoadProgress(Message):
    """A long step of the model's loading (calibration, graph builds, ...): `done` of `total`."""

    def __init__(self, stage: str, done: int, total: int, t: float) -> None:
        super().__init__()
        self.stage = stage
        self.done = done
        self.total = total
        self.t = t  # time.perf_counter() when it was reported


class LoadNote(Message):
    """An informational line of the model's loading (what was built, where, how long it took)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class LoadReporter:
    """The progress reporter (events.ProgressReporter) of a loading worker: posts what the
    pipeline reports as messages to the app (thread-safe), never touching a widget."""

    def __init__(self, app: App[int]) -> None:
        self.app = app

    def progress(self, stage: str, done: int, total: int) -> None:
        self.app.post_message(LoadProgress(stage, done, total, time.perf_counter()))

    def note(self, message: str) -> None:
        self.app.post_message(LoadNote(message))


class ModelFailed(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class EngineStepStarted(Message):
    """The worker started computing the next event at `t` (the CPU is busy from then when the
    engine computes in this thread: the float engine always, the NPU path while decoding)."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t


class EngineEvent(Message):
    """A runtime event with the measured span the engine spent producing it."""

    def __init__(self, timed: TimedEvent, kind: WorkKind, synchronous_engine: bool) -> None:
        super().__init__()
        self.timed = timed
        self.kind = kind
        self.synchronous_engine = synchronous_engine


class SubgraphEvents(Message):
    """SubgraphStarted / SubgraphFinished events of the NPU path, as they happened (a batch)."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events


class WorkFailed(Message):
    """A turn or a document prefill stopped with an error (shown as a notification)."""

    def __init__(self, text: str, kind: WorkKind) -> None:
        super().__init__()
        self.text = text
        self.kind = kind


class WorkStopped(Message):
    """The worker's loop ended (after its last event, a failure or a cancel)."""

    def __init__(self, kind: WorkKind) -> None:
        super().__init__()
        self.kind = kind
