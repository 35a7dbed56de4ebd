"""Turns and document prefills (a mixin of DeployApp): the inference worker and the handlers of
the messages it posts. The worker only posts messages; these handlers, on the UI thread, own the
transcript, the progress and the utilization tracker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from textual import work

from mllm_deploy.errors import UserError
from mllm_deploy.events import ChunkDone, GenerationDone, PrefillDone, TokenEmitted
from mllm_deploy.runtime.telemetry import PrefillProgress, timed_events
from mllm_deploy.tui.app_state import AppState
from mllm_deploy.tui.formatting import seconds, turn_metrics_line, turn_summary_line
from mllm_deploy.tui.messages import EngineEvent, EngineStepStarted, SubgraphEvents, WorkFailed, WorkKind, WorkStopped
from mllm_deploy.tui.session_adapter import SubgraphRelay, relay_subgraph_events
from mllm_deploy.tui.telemetry_view import ENGINE_SPAN
from mllm_deploy.tui.widgets.transcript import MessageView

PENDING_TEXT = "pending: will send when the model is ready · Esc cancels"


@dataclass
class QueuedQuestion:
    """A question sent while the model loads: shown at once, sent when the model is ready."""

    text: str
    view: MessageView  # the user's message in the transcript
    pending: MessageView  # the note under it that says it waits


@dataclass(frozen=True)
class LoadStage:
    """The long step the model's loading reported last (calibration, graph builds, ...)."""

    name: str
    first_done: int  # units done when the stage was first seen (its rate counts from there)
    started: float  # time.perf_counter() then
    done: int = 0
    total: int = 0
    seconds: float = 0.0  # since `started`, at the last report

    @property
    def units(self) -> int:
        return self.done - self.first_done

    def at(self, done: int, total: int, t: float) -> LoadStage:
        return replace(self, done=done, total=total, seconds=t - self.started)


class TurnHandlers(AppState):
    def start_work(self, kind: WorkKind, make_events: Callable[[threading.Event], Iterable[object]]) -> None:
        self.busy = kind
        self.cancel_event = threading.Event()
        self.progress = PrefillProgress(started_at=time.perf_counter())
        self.tokens_emitted = 0
        self.activity = "prefill…"
        self.decoding = False
        self.engine_synchronous = self.deployment.backend == "none"
        self.inference_worker(self.session, make_events, kind, self.cancel_event, self.engine_synchronous)

    @work(thread=True, group="inference")
    def inference_worker(
        self, session, make_events, kind: WorkKind, cancel: threading.Event, synchronous: bool
    ) -> None:
        relay = SubgraphRelay(lambda batch: self.post_message(SubgraphEvents(batch)))
        restore = relay_subgraph_events(session, relay)
        try:
            for timed in timed_events(make_events(cancel), on_start=lambda t: self.post_message(EngineStepStarted(t))):
                relay.flush()
                self.post_message(EngineEvent(timed, kind, synchronous))
        except UserError as err:
            self.post_message(WorkFailed(str(err), kind))
        except Exception as exc:
            self.post_message(WorkFailed(f"{type(exc).__name__}: {exc}", kind))
        finally:
            restore()
            self.post_message(WorkStopped(kind))

    def ready_for_work(self) -> bool:
        if self.session is None:
            text = (
                "the model is still loading"
                if self.loading_started
                else "no model is loaded (see the error above; /set can fix the profile)"
            )
            self.notify(text, severity="warning")
            return False
        if self.busy is not None:
            self.notify("still working on the previous request (Esc cancels it)", severity="warning")
            return False
        return True

    def start_turn(self, text: str, shown_as: MessageView | None = None) -> None:
        """Send `text` now, or queue it while the model loads (`shown_as`: its message, already
        in the transcript, when a queued question is sent)."""
        if self.session is None and self.loading_started is not None:
            view = self.transcript.add("user", text)
            self.queued.append(QueuedQuestion(text, view, self.note(PENDING_TEXT)))
            self.refresh_telemetry(sample=False)
            return
        if not self.ready_for_work():
            return
        prompt = text
        shown = text
        if self.pending_document is not None:
            prompt = self.pending_document["message"] + text
            shown = f"{text}\n(about {self.pending_document['path']})"
            self.pending_document = None
        if shown_as is None:
            self.transcript.add("user", shown)
        self.current_reply = self.transcript.add("assistant")
        session = self.session
        assert session is not None  # ready_for_work() checked it
        self.start_work("turn", lambda cancel: session.send(prompt, cancel=cancel))

    def send_next_queued(self) -> None:
        """The oldest pending question, sent now that the model is ready and idle."""
        if self.queued and self.session is not None and self.busy is None:
            question = self.queued.pop(0)
            question.pending.remove()
            self.start_turn(question.text, shown_as=question.view)

    def drop_queued(self, why: str) -> None:
        """Every pending question, marked `why` and forgotten."""
        for question in self.queued:
            question.pending.remove()
            question.view.append(f"  [{why}]")
        if self.queued:
            self.notify(f"{len(self.queued)} pending question(s) {why}", timeout=4)
        self.queued = []
        self.refresh_telemetry(sample=False)

    def on_engine_step_started(self, message: EngineStepStarted) -> None:
        """The worker's thread computes the next event itself: the float engine always, the NPU
        path while decoding (its prefill runs on executor threads that report their own spans)."""
        if self.busy is not None and (self.engine_synchronous or self.decoding):
            self.tracker.started("cpu", ENGINE_SPAN, message.t, width=self.tracker.slots.get("cpu", 1))

    def on_subgraph_events(self, message: SubgraphEvents) -> None:
        for event in message.events:
            self.tracker.observe(event)

    def on_engine_event(self, message: EngineEvent) -> None:
        timed, event = message.timed, message.timed.event
        self.tracker.finished("cpu", ENGINE_SPAN, timed.busy_end)
        if self.tracker.observe(event):
            return
        if isinstance(event, ChunkDone):
            self.progress.update(event, time.perf_counter())
            remaining = event.index + 1 < event.n_chunks
            self.activity = f"chunk {event.index + 2}/{event.n_chunks}" if remaining else "prefill done"
            self.refresh_telemetry(sample=False)
        elif isinstance(event, PrefillDone):
            self.activity = "decode" if message.kind == "turn" else "prefill done"
            self.decoding = True
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
        self.last_turn = turn_summary_line(done, context_used, context_max)
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
        if self.current_reply is not None:
            self.current_reply.append(" [failed]")
        self.note(message.text, role="error")
        self.notify(message.text, title="Generation failed" if message.kind == "turn" else "Loading the document failed",
                    severity="error", timeout=10)  # fmt: skip

    def on_work_stopped(self, message: WorkStopped) -> None:
        self.tracker.close_all(time.perf_counter())
        self.busy = None
        self.finished_work += 1
        self.cancel_event = None
        self.current_reply = None
        self.activity = ""
        self.refresh_telemetry(sample=False)
        self.send_next_queued()
