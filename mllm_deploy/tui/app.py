"""The `mllm-deploy up` app: chat + prefill sessions over a loaded model, with live telemetry.

Threads: the model loads and every turn / document prefill runs in `@work(thread=True)`
workers that only post messages (messages.py); the handlers below own all widget and
session-bookkeeping state. Slash commands live in command_handlers.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import ClassVar

from textual import events, on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Header, Input

from mllm_deploy.errors import UserError
from mllm_deploy.events import reporting
from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.interface.session import ChatSession, LoadedModel, load_model
from mllm_deploy.profile import LoadedProfile
from mllm_deploy.runtime.telemetry import (
    PrefillProgress,
    ProcessSample,
    ProcessSampler,
    SessionMetrics,
    UtilizationTracker,
)
from mllm_deploy.tui.app_state import ModelLoader, SessionFactory
from mllm_deploy.tui.command_handlers import CommandHandlers
from mllm_deploy.tui.commands import chat_text, parse_command
from mllm_deploy.tui.formatting import loading_line, prefill_line, seconds
from mllm_deploy.tui.messages import LoadNote, LoadProgress, LoadReporter, ModelFailed, ModelReady, WorkKind
from mllm_deploy.tui.session_adapter import close_engine, executor_slots
from mllm_deploy.tui.sessions import SavedSession
from mllm_deploy.tui.telemetry_view import LANE_SECONDS, telemetry_state
from mllm_deploy.tui.turn_handlers import LoadStage, QueuedQuestion, TurnHandlers
from mllm_deploy.tui.widgets.prompt_input import PromptInput
from mllm_deploy.tui.widgets.telemetry_panel import TelemetryPanel
from mllm_deploy.tui.widgets.transcript import MessageView, Transcript

TRACKER_KEEP_SECONDS = LANE_SECONDS + 3.0  # spans older than the lane are not needed


def default_model_loader(deployment: Deployment) -> LoadedModel:
    return load_model(deployment)


def default_session_factory(model: LoadedModel, loaded_profile: LoadedProfile) -> ChatSession:
    return ChatSession(model, loaded_profile)


class DeployApp(TurnHandlers, CommandHandlers, App[int]):
    TITLE = "mllm-deploy"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("escape", "cancel_work", "Cancel"),
        Binding("f1", "help", "Help"),
        Binding("f2", "plan", "Plan"),
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+r", "reset", "Reset"),
    ]
    CSS = """
    #prompt { border: none; height: 1; padding: 0 1; background: $boost; }
    #prompt:focus { border: none; background: $boost; }
    """

    def __init__(
        self,
        deployment: Deployment,
        *,
        model_loader: ModelLoader = default_model_loader,
        session_factory: SessionFactory = default_session_factory,
        resume: SavedSession | None = None,
    ) -> None:
        super().__init__()
        self.deployment = deployment
        self.model_loader = model_loader
        self.session_factory = session_factory
        self.model: LoadedModel | None = None
        self.session: ChatSession | None = None
        self.restore_messages: list[dict] | None = list(resume.messages) if resume else None
        self.pending_document: dict | None = resume.pending_document if resume else None
        self.session_name: str | None = resume.name if resume else None
        self.busy: WorkKind | None = None
        self.finished_work = 0  # turns and document prefills ended so far (success, cancel or failure)
        self.cancel_event: threading.Event | None = None
        self.current_reply: MessageView | None = None
        self.progress = PrefillProgress()
        self.activity = ""
        self.tokens_emitted = 0
        self.loading_started: float | None = None
        self.loading_detail = ""  # the last progress line of the model build
        self.load_stage: LoadStage | None = None  # the long step the loading reports (calibration, graphs)
        self.queued: list[QueuedQuestion] = []  # questions sent while the model loads, in order
        self.decoding = False  # the running turn is past its prefill
        self.engine_synchronous = deployment.backend == "none"
        self.metrics = SessionMetrics()
        self.last_turn = "no turn yet"
        self.tracker = UtilizationTracker(keep_seconds=TRACKER_KEEP_SECONDS)
        self.histories: dict[str, list[float]] = {"npu": [], "cpu": []}
        self.process_sampler = ProcessSampler()
        self.last_process_sample: ProcessSample | None = None
        self._refresh_timer: Timer | None = None

    # ---- layout and lifecycle -------------------------------------------------------
    def compose(self) -> ComposeResult:
        # Kept as attributes: handlers and the refresh timer reach them while another screen
        # (plan view, command palette) is on top, where `query_one` would search that screen.
        self.transcript = Transcript(id="transcript")
        self.telemetry_panel = TelemetryPanel(id="telemetry")
        self.prompt_input = PromptInput(placeholder="Ask something, or /help", id="prompt")
        yield Header()
        yield self.transcript
        yield self.telemetry_panel
        yield self.prompt_input
        yield Footer()

    def on_mount(self) -> None:
        self.begin_capture_print(self, stdout=True, stderr=True)  # build/calibration progress lines
        self.apply_titles()
        self.restart_refresh_timer()
        self.prompt_input.focus()
        if self.restore_messages:
            self.show_messages(self.restore_messages)
            self.note(f"reopened session {self.session_name!r}: {len(self.restore_messages)} message(s); "
                      "the conversation is prefilled on the next turn")  # fmt: skip
        self.start_loading("start")

    def apply_titles(self) -> None:
        d = self.deployment
        self.title = f"mllm-deploy · {d.profile.name}"
        self.sub_title = f"{d.resolved.spec.name} · {d.npu_label}"

    def restart_refresh_timer(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.stop()
        self._refresh_timer = self.set_interval(1.0 / self.deployment.profile.ui.refresh_hz, self.refresh_telemetry)
        self.refresh_telemetry()

    def note(self, text: str, role: str = "note") -> MessageView:
        return self.transcript.add(role, text)

    def show_messages(self, messages: Iterable[dict]) -> None:
        for message in messages:
            self.transcript.add(message["role"], message["content"])

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity="information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Notifications show user text (paths, keys like `decode.stop[0]`) literally: no markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def notify_error(self, err: Exception, title: str = "Error") -> None:
        self.notify(str(err), title=title, severity="error", timeout=8)

    # ---- model loading ------------------------------------------------------------------
    def start_loading(self, reason: str) -> None:
        close_engine(self.model)
        self.model = self.session = None
        self.loading_started = time.perf_counter()
        self.loading_detail = ""
        self.load_stage = None
        self.note(f"loading {self.deployment.profile.model.source} (weights, tokenizer, chat template)…")
        self.load_model_worker(self.deployment, reason)
        self.refresh_telemetry(sample=False)

    @work(thread=True, group="model", exclusive=True)
    def load_model_worker(self, deployment: Deployment, reason: str) -> None:
        try:
            with reporting(LoadReporter(self)):  # calibration and graph builds report here, not to stderr
                model = self.model_loader(deployment)
            session = self.session_factory(model, deployment.loaded)
        except UserError as err:
            self.post_message(ModelFailed(str(err)))
            return
        except Exception as exc:
            self.post_message(ModelFailed(f"the model failed to load: {type(exc).__name__}: {exc}"))
            return
        self.post_message(ModelReady(model, session, reason))

    def on_print(self, event: events.Print) -> None:
        """Progress lines the model build prints (calibration, graphs) become the loading detail."""
        lines = [line.strip() for line in event.text.replace("\r", "\n").splitlines() if line.strip()]
        if lines and self.loading_started is not None:
            self.loading_detail = lines[-1]

    def on_load_progress(self, message: LoadProgress) -> None:
        """Stage, k of N and the stage's ETA in the loading line."""
        if self.loading_started is None:
            return
        stage = self.load_stage
        if stage is None or stage.name != message.stage or message.done < stage.first_done:
            stage = LoadStage(message.stage, message.done, message.t)
        self.load_stage = stage.at(message.done, message.total, message.t)
        self.refresh_telemetry(sample=False)

    def on_load_note(self, message: LoadNote) -> None:
        lines = [line.strip() for line in message.text.splitlines() if line.strip()]
        if lines and self.loading_started is not None:
            self.loading_detail = lines[-1]

    def on_model_ready(self, message: ModelReady) -> None:
        self.model, self.session = message.model, message.session
        self.tracker = UtilizationTracker(slots=executor_slots(self.model), keep_seconds=TRACKER_KEEP_SECONDS)
        if self.restore_messages is not None:
            self.session.messages = list(self.restore_messages)
            self.restore_messages = None
        elapsed = time.perf_counter() - (self.loading_started or time.perf_counter())
        self.loading_started = None
        spec = getattr(self.model, "spec", None)
        self.note(f"model ready: {getattr(spec, 'name', 'model')} in {seconds(elapsed)} · {self.deployment.npu_label} · "
                  f"context {self.deployment.profile.prefill.max_context:,} tokens · /help for commands")  # fmt: skip
        self.send_next_queued()

    def on_model_failed(self, message: ModelFailed) -> None:
        self.loading_started = None
        self.drop_queued("not sent: the model failed to load")
        self.note(message.text, role="error")
        self.notify(message.text, title="Model failed", severity="error", timeout=10)

    # ---- telemetry ------------------------------------------------------------------------------------
    def refresh_telemetry(self, *, sample: bool = True) -> None:
        """Redraw the telemetry panel; `sample` (the ui.refresh_hz timer) also adds a history point."""
        now = time.perf_counter()
        if sample:
            self.last_process_sample = self.process_sampler.sample()
        state = telemetry_state(
            self.deployment,
            self.tracker,
            self.histories,
            add_point=sample,
            now=now,
            activity=self.activity if self.busy else "",
            progress=self.progress_text(now),
            process=self.last_process_sample,
            last_turn=self.last_turn,
        )
        self.telemetry_panel.show(state)

    def progress_text(self, now: float) -> str:
        if self.loading_started is not None:
            elapsed = now - self.loading_started
            stage = self.load_stage
            running = stage is not None and stage.done < stage.total
            if stage is not None and running:
                line = loading_line(elapsed, stage.name, stage.done, stage.total, stage.seconds, stage.units)
            else:
                line = loading_line(elapsed, "", 0, 0, 0.0, 0)
            detail = f" · {self.loading_detail}" if self.loading_detail and not running else ""
            pending = f" · {len(self.queued)} question(s) pending" if self.queued else ""
            return f"{line}{detail}{pending}"
        if self.busy is None:
            return ""
        if self.tokens_emitted:
            return f"decode token {self.tokens_emitted}"
        return prefill_line(self.progress)

    # ---- input ----------------------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def on_prompt_submitted(self, event: Input.Submitted) -> None:
        line = event.value
        prompt = self.prompt_input
        prompt.value = ""
        if not line.strip():
            return
        prompt.remember(line)
        try:
            command = parse_command(line)
        except UserError as err:
            self.notify_error(err, "Unknown command")
            return
        if command is None:
            self.start_turn(chat_text(line))
        else:
            self.run_command(command)

    # ---- actions --------------------------------------------------------------------------------------
    def action_cancel_work(self) -> None:
        """Esc: cancel the running turn or document prefill, and every question still pending."""
        if self.cancel_event is not None and not self.cancel_event.is_set():
            self.cancel_event.set()
            self.notify("cancelling: stops after the current chunk or token", timeout=3)
        if self.queued:
            self.drop_queued("cancelled (Esc): not sent")

    async def action_quit(self) -> None:
        self.quit_app()

    def quit_app(self) -> None:
        """Ctrl+Q and /quit: cancel the running work and exit with 0."""
        if self.cancel_event is not None:
            self.cancel_event.set()
        self.exit(0)

    def on_unmount(self) -> None:
        if self.busy is None:
            close_engine(self.model)

    def action_help(self) -> None:
        self.command_help("")

    def action_plan(self) -> None:
        self.command_plan("")

    def action_save(self) -> None:
        self.command_save("")

    def action_reset(self) -> None:
        self.command_reset("")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Plan view", "Resolved profile and execution plan (F2)", self.action_plan)
        yield SystemCommand("Help", "Commands and key bindings (F1)", self.action_help)
        yield SystemCommand(
            "New conversation", "Forget the conversation and empty the KV cache (Ctrl+R)", self.action_reset
        )
        yield SystemCommand("Save session", "Transcript as markdown + session file (Ctrl+S)", self.action_save)
        yield SystemCommand("Session stats", "TTFT, prefill and decode rates so far", lambda: self.command_stats(""))
        yield SystemCommand("Load a document…", "Type the path after /load", lambda: self.prefill_input("/load "))
        yield SystemCommand("Set a profile key…", "Type KEY=VALUE after /set", lambda: self.prefill_input("/set "))

    def prefill_input(self, text: str) -> None:
        prompt = self.prompt_input
        prompt.value = text
        prompt.cursor_position = len(text)
        prompt.focus()
