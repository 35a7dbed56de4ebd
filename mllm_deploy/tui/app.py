"""The `mllm-deploy up` app: chat + prefill sessions over a loaded model, with live telemetry.

Threads: the model loads and every turn / document prefill runs in `@work(thread=True)`
workers that only post messages (messages.py); the handlers below own all widget and
session-bookkeeping state. Slash commands live in command_handlers.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Input

from mllm_deploy.errors import UserError
from mllm_deploy.runtime.events import ChunkDone, GenerationDone, PrefillDone, TokenEmitted
from mllm_deploy.runtime.telemetry import (
    PrefillProgress,
    ProcessSampler,
    SessionMetrics,
    UtilizationTracker,
    timed_events,
)
from mllm_deploy.tui.command_handlers import CommandHandlers
from mllm_deploy.tui.commands import chat_text, parse_command
from mllm_deploy.tui.deployment import Deployment
from mllm_deploy.tui.formatting import prefill_line, seconds, turn_metrics_line
from mllm_deploy.tui.messages import (
    EngineEvent,
    EngineStepStarted,
    ModelFailed,
    ModelReady,
    WorkFailed,
    WorkKind,
    WorkStopped,
)
from mllm_deploy.tui.sessions import SavedSession
from mllm_deploy.tui.widgets.prompt_input import PromptInput
from mllm_deploy.tui.telemetry_view import ENGINE_SPAN, telemetry_state
from mllm_deploy.tui.widgets.telemetry_panel import TelemetryPanel
from mllm_deploy.tui.widgets.transcript import MessageView, Transcript


def default_model_loader(loaded_profile):
    from mllm_deploy.runtime.session import load_model

    return load_model(loaded_profile)


def default_session_factory(model, loaded_profile):
    from mllm_deploy.runtime.session import ChatSession

    return ChatSession(model, loaded_profile)


class DeployApp(CommandHandlers, App[int]):
    TITLE = "mllm-deploy"
    BINDINGS = [
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
        model_loader: Callable = default_model_loader,
        session_factory: Callable = default_session_factory,
        resume: SavedSession | None = None,
    ) -> None:
        super().__init__()
        self.deployment = deployment
        self.model_loader = model_loader
        self.session_factory = session_factory
        self.model = None
        self.session = None
        self.restore_messages: list[dict] | None = list(resume.messages) if resume else None
        self.pending_document: dict | None = resume.pending_document if resume else None
        self.session_name: str | None = resume.name if resume else None
        self.busy: WorkKind | None = None
        self.cancel_event: threading.Event | None = None
        self.current_reply: MessageView | None = None
        self.progress = PrefillProgress()
        self.activity = ""
        self.tokens_emitted = 0
        self.loading_started: float | None = None
        self.metrics = SessionMetrics()
        self.last_turn = "no turn yet"
        self.tracker = UtilizationTracker()
        self.histories: dict[str, list[float]] = {"npu": [], "cpu": []}
        self.process_sampler = ProcessSampler()
        self.last_process_sample = None
        self._refresh_timer = None

    # ---- layout and lifecycle -------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        yield Transcript(id="transcript")
        yield TelemetryPanel(id="telemetry")
        yield PromptInput(placeholder="Ask something, or /help", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.apply_titles()
        self.restart_refresh_timer()
        self.query_one(PromptInput).focus()
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

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    def note(self, text: str, role: str = "note") -> MessageView:
        return self.transcript.add(role, text)

    def show_messages(self, messages: Iterable[dict]) -> None:
        for message in messages:
            self.transcript.add(message["role"], message["content"])

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None, markup: bool = False) -> None:
        """Notifications show user text (paths, keys like `decode.stop[0]`) literally: no markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def notify_error(self, err: Exception, title: str = "Error") -> None:
        self.notify(str(err), title=title, severity="error", timeout=8)

    # ---- model loading ------------------------------------------------------------------
    def start_loading(self, reason: str) -> None:
        self.model = self.session = None
        self.loading_started = time.perf_counter()
        self.note(f"loading {self.deployment.profile.model.source} (weights, tokenizer, chat template)…")
        self.load_model_worker(self.deployment, reason)
        self.refresh_telemetry(sample=False)

    @work(thread=True, group="model", exclusive=True)
    def load_model_worker(self, deployment: Deployment, reason: str) -> None:
        try:
            model = self.model_loader(deployment.loaded)
            session = self.session_factory(model, deployment.loaded)
        except UserError as err:
            self.post_message(ModelFailed(str(err)))
            return
        except Exception as exc:  # noqa: BLE001 - shown as a notification, the app stays up
            self.post_message(ModelFailed(f"the model failed to load: {type(exc).__name__}: {exc}"))
            return
        self.post_message(ModelReady(model, session, reason))

    def on_model_ready(self, message: ModelReady) -> None:
        self.model, self.session = message.model, message.session
        if self.restore_messages is not None:
            self.session.messages = list(self.restore_messages)
            self.restore_messages = None
        elapsed = time.perf_counter() - (self.loading_started or time.perf_counter())
        self.loading_started = None
        spec = getattr(self.model, "spec", None)
        self.note(f"model ready: {getattr(spec, 'name', 'model')} in {seconds(elapsed)} · {self.deployment.npu_label} · "
                  f"context {self.deployment.profile.prefill.max_context:,} tokens · /help for commands")  # fmt: skip

    def on_model_failed(self, message: ModelFailed) -> None:
        self.loading_started = None
        self.note(message.text, role="error")
        self.notify(message.text, title="Model failed", severity="error", timeout=10)

    # ---- turns and document prefills ----------------------------------------------------------
    def start_work(self, kind: WorkKind, make_events: Callable[[threading.Event], Iterable[object]]) -> None:
        self.busy = kind
        self.cancel_event = threading.Event()
        self.progress = PrefillProgress()
        self.tokens_emitted = 0
        self.activity = "prefill…"
        synchronous = self.deployment.backend == "none"
        self.inference_worker(make_events, kind, self.cancel_event, synchronous)

    @work(thread=True, group="inference")
    def inference_worker(self, make_events, kind: WorkKind, cancel: threading.Event, synchronous: bool) -> None:
        on_start = (lambda t: self.post_message(EngineStepStarted(t))) if synchronous else None
        try:
            for timed in timed_events(make_events(cancel), on_start=on_start):
                self.post_message(EngineEvent(timed, kind, synchronous))
        except UserError as err:
            self.post_message(WorkFailed(str(err), kind))
        except Exception as exc:  # noqa: BLE001 - a model failure is a notification, not a crash
            self.post_message(WorkFailed(f"{type(exc).__name__}: {exc}", kind))
        finally:
            self.post_message(WorkStopped(kind))

    def ready_for_work(self) -> bool:
        if self.session is None:
            text = "the model is still loading" if self.loading_started else "no model is loaded (see the error above; /set can fix the profile)"
            self.notify(text, severity="warning")
            return False
        if self.busy is not None:
            self.notify("still working on the previous request (Esc cancels it)", severity="warning")
            return False
        return True

    def start_turn(self, text: str) -> None:
        if not self.ready_for_work():
            return
        prompt = text
        shown = text
        if self.pending_document is not None:
            prompt = self.pending_document["message"] + text
            shown = f"{text}\n(about {self.pending_document['path']})"
            self.pending_document = None
        self.transcript.add("user", shown)
        self.current_reply = self.transcript.add("assistant")
        session = self.session
        self.start_work("turn", lambda cancel: session.send(prompt, cancel=cancel))

    def on_engine_step_started(self, message: EngineStepStarted) -> None:
        if self.busy is not None:
            self.tracker.started("cpu", ENGINE_SPAN, message.t)

    def on_engine_event(self, message: EngineEvent) -> None:
        timed, event = message.timed, message.timed.event
        if message.synchronous_engine:
            self.tracker.finished("cpu", ENGINE_SPAN, timed.busy_end)
        elif self.tracker.observe(event):
            return
        if isinstance(event, ChunkDone):
            self.progress.update(event)
            remaining = event.index + 1 < event.n_chunks
            self.activity = f"chunk {event.index + 2}/{event.n_chunks}" if remaining else "prefill done"
            self.refresh_telemetry(sample=False)
        elif isinstance(event, PrefillDone):
            self.activity = "decode" if message.kind == "turn" else "prefill done"
        elif isinstance(event, TokenEmitted):
            if message.kind == "turn" and self.current_reply is not None:
                self.current_reply.append(event.text)
                self.tokens_emitted = event.index + 1
                self.activity = f"decode token {self.tokens_emitted}"
        elif isinstance(event, GenerationDone):
            self.finish(event, message.kind)

    def finish(self, done: GenerationDone, kind: WorkKind) -> None:
        context_used = self.session.cache.length if self.session is not None else done.prompt_tokens
        context_max = self.deployment.profile.prefill.max_context
        if kind == "document":
            self.metrics.record_prefill(done)
            self.finish_document(done, context_used, context_max)
            return
        self.metrics.record(done)
        if done.finish_reason == "cancelled" and self.current_reply is not None:
            self.current_reply.append(" [cancelled]")
        self.last_turn = "last turn: " + turn_metrics_line(done, context_used, context_max)
        self.note(turn_metrics_line(done, context_used, context_max), role="metrics")

    def finish_document(self, done: GenerationDone, context_used: int, context_max: int) -> None:
        loading = self.loading_document or {}
        m = done.metrics
        rate = f"{m.prefill_tokens_per_s:,.0f} tok/s" if m and m.prefill_tokens_per_s else "-"
        if done.finish_reason == "cancelled":
            self.note(f"loading {loading.get('path')} cancelled after {done.prefilled_tokens:,} tokens")
            return
        self.pending_document = loading
        self.last_turn = (f"document: {done.prefilled_tokens:,} tokens prefilled in "
                          f"{seconds(m.prefill_seconds if m else None)} ({rate}) · context {context_used:,}/{context_max:,}")  # fmt: skip
        self.note(f"{loading.get('path')}: {done.prompt_tokens:,} tokens in context ({done.prefilled_tokens:,} prefilled "
                  f"in {seconds(m.prefill_seconds if m else None)} = {rate}, {done.reused_tokens:,} reused). "
                  "Ask your question about it.")  # fmt: skip

    def on_work_failed(self, message: WorkFailed) -> None:
        self.note(message.text, role="error")
        self.notify(message.text, title="Generation failed" if message.kind == "turn" else "Loading the document failed",
                    severity="error", timeout=10)  # fmt: skip

    def on_work_stopped(self, message: WorkStopped) -> None:
        self.tracker.close_all(time.perf_counter())
        self.busy = None
        self.cancel_event = None
        self.current_reply = None
        self.activity = ""
        self.refresh_telemetry()

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
        self.query_one(TelemetryPanel).show(state)

    def progress_text(self, now: float) -> str:
        if self.loading_started is not None:
            return f"loading model… {now - self.loading_started:.1f} s"
        if self.busy is None:
            return ""
        if self.tokens_emitted:
            return f"decode token {self.tokens_emitted}"
        return prefill_line(self.progress)

    # ---- input ----------------------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def on_prompt_submitted(self, event: Input.Submitted) -> None:
        line = event.value
        prompt = self.query_one(PromptInput)
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
        if self.cancel_event is not None and not self.cancel_event.is_set():
            self.cancel_event.set()
            self.notify("cancelling: stops after the current chunk or token", timeout=3)

    def action_quit(self) -> None:
        if self.cancel_event is not None:
            self.cancel_event.set()
        self.exit(0)

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
        yield SystemCommand("New conversation", "Forget the conversation and empty the KV cache (Ctrl+R)", self.action_reset)
        yield SystemCommand("Save session", "Transcript as markdown + session file (Ctrl+S)", self.action_save)
        yield SystemCommand("Session stats", "TTFT, prefill and decode rates so far", lambda: self.command_stats(""))
        yield SystemCommand("Load a document…", "Type the path after /load", lambda: self.prefill_input("/load "))
        yield SystemCommand("Set a profile key…", "Type KEY=VALUE after /set", lambda: self.prefill_input("/set "))

    def prefill_input(self, text: str) -> None:
        prompt = self.query_one(PromptInput)
        prompt.value = text
        prompt.cursor_position = len(text)
        prompt.focus()
