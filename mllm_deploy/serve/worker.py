"""The engine's one worker thread: takes requests from the fair queue and runs each as a turn of a
`ChatSession` (the interface layer's, as `run` and `chat` do), posting its events back.

KV reuse: the worker keeps `kv_slots` sessions, each with its own KV cache. A request runs on the
slot whose cache holds the longest prefix of its prompt (a shared system prompt, an earlier turn
of the same conversation), so only the rest is prefilled; the response says how many tokens were
reused. A request whose client went away stops between tokens (or between subgraphs in an NPU
prefill) and its slot's KV cache is released.

Busy time is measured, never estimated: on the NPU path the executors' subgraph spans during the
prefill (npu, cpu), plus the decode steps' time on the CPU; on the float engine the time spent
computing each event (it computes synchronously, on the CPU).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mllm_deploy.errors import UserError
from mllm_deploy.events import GenerationDone, PrefillDone, SubgraphFinished, SubgraphStarted
from mllm_deploy.interface.session import ChatSession, LoadedModel
from mllm_deploy.runtime.sampling import SamplingSettings
from mllm_deploy.runtime.telemetry import timed_events
from mllm_deploy.serve.queue import FairQueue
from mllm_deploy.serve.schemas import ApiError


@dataclass
class Job:
    """One request waiting for (or running on) the engine."""

    messages: list[dict] | None  # a chat request: the conversation (rendered with the chat template)
    text: str | None  # a completion request: raw text
    max_new_tokens: int
    sampling: SamplingSettings
    stop: tuple[str, ...]
    user: str
    post: Callable[[object], None]  # delivers an event to the request's handler (thread-safe)
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class JobStarted:
    queue_seconds: float
    prompt_tokens: int


@dataclass(frozen=True)
class JobFinished:
    done: GenerationDone
    queue_seconds: float
    busy_seconds: dict[str, float]  # processor -> measured busy seconds of this request


@dataclass(frozen=True)
class JobFailed:
    error: ApiError


class EngineWorker:
    """Runs queued jobs one at a time on the loaded model; `stop()` ends the thread."""

    def __init__(
        self,
        model: LoadedModel,
        loaded_profile,
        queue: FairQueue[Job],
        *,
        kv_slots: int,
        on_finished: Callable[[JobFinished], None],
    ):
        self.model = model
        self.queue = queue
        self.slots = [ChatSession(model, loaded_profile) for _ in range(kv_slots)]
        self._last_used = [0.0] * kv_slots
        self._on_finished = on_finished
        self._npu_path = model.engine.describe().get("npu", "none") != "none"
        self.running: Job | None = None
        self.busy_seconds: dict[str, float] = {name: 0.0 for name in ("npu", "cpu")}
        self.started_at = time.perf_counter()
        self.recent_seconds: list[float] = []  # the last requests' wall times (Retry-After)
        self._thread = threading.Thread(target=self._loop, name="mllm-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Close the queue, cancel the running job and wait for the thread; False if it did not end in time."""
        self.queue.close()
        running = self.running
        if running is not None:
            running.cancel.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def kv_positions(self) -> tuple[int, int]:
        """(tokens held, positions allocated) over the slots' KV caches."""
        return sum(s.cache.length for s in self.slots), sum(s.cache.allocated for s in self.slots)

    def mean_request_seconds(self) -> float:
        recent = self.recent_seconds[-16:]
        return sum(recent) / len(recent) if recent else 1.0

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancel.is_set():  # its client went away while it waited
                continue
            self.running = job
            started = time.perf_counter()
            try:
                self._run(job)
            except UserError as err:  # the prompt does not fit the context (prefill.overflow = "error")
                job.post(JobFailed(ApiError(400, "; ".join(d.message for d in err.diagnostics),
                                            param="messages" if job.messages is not None else "prompt",
                                            code="context_length_exceeded")))  # fmt: skip
            except Exception as exc:  # never let one request end the worker
                job.post(JobFailed(ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                            type="server_error")))  # fmt: skip
            finally:
                self.running = None
                self.recent_seconds = [*self.recent_seconds[-63:], time.perf_counter() - started]

    def _pick_slot(self, ids: list[int]) -> int:
        """The slot whose cache holds the longest prefix of `ids` (ties: the least recently used)."""
        return max(range(len(self.slots)), key=lambda i: (self.slots[i].cache.common_prefix(ids), -self._last_used[i]))

    def _run(self, job: Job) -> None:
        first = self.slots[0]
        ids = (
            first.chat_ids(job.messages)
            if job.messages is not None
            else self.model.tokenizer.encode(job.text or "", allow_special=True)
        )
        slot = self._pick_slot(ids)
        self._last_used[slot] = time.perf_counter()
        session = self.slots[slot]
        events = session.generate(  # fits the prompt to the context first: UserError when it cannot
            ids, cancel=job.cancel, max_new_tokens=job.max_new_tokens, sampling=job.sampling, stop=job.stop
        )
        queue_seconds = time.perf_counter() - job.enqueued
        job.post(JobStarted(queue_seconds, len(ids)))
        busy = {"npu": 0.0, "cpu": 0.0}
        prefilling = True
        for timed in timed_events(events):
            event = timed.event
            if isinstance(event, SubgraphStarted):
                continue
            if isinstance(event, SubgraphFinished):
                busy[event.processor] = busy.get(event.processor, 0.0) + event.t_end - event.t_start
                continue
            if not (prefilling and self._npu_path):  # the executors' spans count the NPU path's prefill
                busy["cpu"] += timed.busy_end - timed.busy_start
            if isinstance(event, PrefillDone):
                prefilling = False
            if isinstance(event, GenerationDone):
                if event.finish_reason == "cancelled":
                    session.release_cache()  # its client is gone: free the KV it filled
                for name, seconds in busy.items():
                    self.busy_seconds[name] = self.busy_seconds.get(name, 0.0) + seconds
                finished = JobFinished(event, queue_seconds, busy)
                self._on_finished(finished)
                job.post(finished)
            else:
                job.post(event)
