"""What the app's mixins (turn_handlers, command_handlers) share with DeployApp, typed: the state
DeployApp.__init__ sets up and the methods DeployApp defines that the mixins call.

The usual mixin pattern: for the type checker `AppState` is an `App[int]` (so `notify`,
`post_message`, `push_screen`, ... are known); at run time it is a plain object holding no
methods, so nothing here stands between DeployApp and textual's App in the MRO.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.interface.session import ChatSession, LoadedModel
from mllm_deploy.profile import LoadedProfile
from mllm_deploy.runtime.telemetry import PrefillProgress, SessionMetrics, UtilizationTracker
from mllm_deploy.tui.messages import WorkKind

if TYPE_CHECKING:
    from textual.app import App

    from mllm_deploy.tui.turn_handlers import QueuedQuestion
    from mllm_deploy.tui.widgets.transcript import MessageView, Transcript

    _AppBase = App[int]
else:
    _AppBase = object

ModelLoader = Callable[[Deployment], LoadedModel]
SessionFactory = Callable[[LoadedModel, LoadedProfile], ChatSession]


class AppState(_AppBase):
    deployment: Deployment
    session_factory: SessionFactory
    model: LoadedModel | None  # None while loading or after a failed load
    session: ChatSession | None  # exists exactly when `model` does
    restore_messages: list[dict] | None  # a conversation to put into the next session
    pending_document: dict | None  # a loaded document, sent with the next question
    loading_document: dict | None = None  # the document a /load is prefilling
    session_name: str | None
    busy: WorkKind | None  # the running turn or document prefill
    finished_work: int
    cancel_event: threading.Event | None
    current_reply: MessageView | None
    progress: PrefillProgress
    activity: str
    tokens_emitted: int
    loading_started: float | None
    decoding: bool
    engine_synchronous: bool
    metrics: SessionMetrics
    last_turn: str
    tracker: UtilizationTracker
    transcript: Transcript
    queued: list[QueuedQuestion]  # questions sent while the model loads

    if TYPE_CHECKING:
        # defined by DeployApp (app.py)
        def note(self, text: str, role: str = "note") -> MessageView: ...
        def notify_error(self, err: Exception, title: str = "Error") -> None: ...
        def show_messages(self, messages: Iterable[dict]) -> None: ...
        def apply_titles(self) -> None: ...
        def restart_refresh_timer(self) -> None: ...
        def refresh_telemetry(self, *, sample: bool = True) -> None: ...
        def start_loading(self, reason: str) -> None: ...
        def quit_app(self) -> None: ...

        # defined by TurnHandlers, called by CommandHandlers
        def ready_for_work(self) -> bool: ...
        def start_work(self, kind: WorkKind, make_events: Callable[[threading.Event], Iterable[object]]) -> None: ...
