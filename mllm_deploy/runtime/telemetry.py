"""Measured telemetry for front ends: processor busy time, process CPU/RSS, prefill progress, session metrics.

Nothing here is estimated or invented. Processor utilization is the measured busy fraction of
each executor over a sliding window, computed from busy spans with timestamps:

- on the NPU path the runtime emits `SubgraphStarted` / `SubgraphFinished` events (processor,
  subgraph id, measured perf_counter times); :meth:`UtilizationTracker.observe` turns them into spans;
- the float engine (`device.npu_backend = "none"`) computes synchronously inside the
  generator that yields its events, so the time spent inside `next()` *is* the CPU
  executor's busy time: :func:`timed_events` measures exactly that.

Process CPU % and RSS come from psutil. Times are `time.perf_counter()` seconds.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import psutil

from mllm_deploy.events import ChunkDone, GenerationDone, SubgraphFinished, SubgraphStarted

PROCESSORS = ("npu", "cpu")


@dataclass(frozen=True)
class BusySpan:
    """One piece of work that occupied one slot of a processor from `start` to `end`."""

    processor: str
    label: str  # e.g. "c3.L12.gate_up", or "engine" for the float engine's synchronous work
    start: float
    end: float
    width: int = 1  # slots it occupied (decode on every CPU thread: all of them)


class UtilizationTracker:
    """Busy spans per processor; busy fraction over any recent window, and lanes of cells.

    `slots` is how many pieces of work a processor runs at once (the NPU: 1, an in-order
    queue; the CPU: its executor threads). Busy fraction = busy slot-time / (slots x window).
    """

    def __init__(self, slots: dict[str, int] | None = None, keep_seconds: float = 120.0):
        self.slots = {p: 1 for p in PROCESSORS} | (slots or {})
        self.keep_seconds = keep_seconds
        self._spans: dict[str, deque[BusySpan]] = {p: deque() for p in self.slots}
        self._open: dict[str, dict[str, tuple[float, int]]] = {p: {} for p in self.slots}  # label -> (start, width)

    def _processor(self, processor: str) -> str:
        if processor not in self.slots:
            self.slots[processor] = 1
            self._spans[processor] = deque()
            self._open[processor] = {}
        return processor

    def started(self, processor: str, label: str, t: float, width: int = 1) -> None:
        self._open[self._processor(processor)][label] = (t, width)

    def finished(self, processor: str, label: str, t: float) -> None:
        opened = self._open[self._processor(processor)].pop(label, None)
        if opened is not None:
            self.add_span(processor, label, opened[0], t, opened[1])

    def add_span(self, processor: str, label: str, start: float, end: float, width: int = 1) -> None:
        spans = self._spans[self._processor(processor)]
        spans.append(BusySpan(processor, label, start, max(start, end), width))
        while spans and spans[0].end < end - self.keep_seconds:
            spans.popleft()

    def close_all(self, t: float) -> None:
        """End every open span at `t` (a turn stopped: nothing is running any more)."""
        for processor, open_spans in self._open.items():
            for label in list(open_spans):
                self.finished(processor, label, t)

    def running(self, processor: str) -> list[str]:
        """Labels of the work open on `processor` right now, oldest first."""
        open_spans = self._open.get(processor, {})
        return sorted(open_spans, key=lambda label: open_spans[label][0])

    def last_finished(self, processor: str) -> BusySpan | None:
        spans = self._spans.get(processor)
        return spans[-1] if spans else None

    def _busy_seconds(self, processor: str, start: float, end: float) -> float:
        busy = 0.0
        for span in self._spans.get(processor, ()):
            busy += span.width * max(0.0, min(span.end, end) - max(span.start, start))
        for opened, width in self._open.get(processor, {}).values():
            busy += width * max(0.0, end - max(opened, start))
        return busy

    def busy_fraction(self, processor: str, now: float, window: float) -> float:
        """Measured share of `[now - window, now]` that `processor` was busy, 0..1."""
        if window <= 0:
            return 0.0
        capacity = self.slots.get(processor, 1) * window
        return min(1.0, self._busy_seconds(processor, now - window, now) / capacity)

    def lane(self, processor: str, now: float, window: float, cells: int) -> list[float]:
        """Busy fraction of each of `cells` equal slices of `[now - window, now]`, oldest first."""
        width = window / cells
        start = now - window
        busy = [0.0] * cells
        spans = [(s.start, s.end, s.width) for s in self._spans.get(processor, ()) if s.end > start]
        spans += [(t, now, w) for t, w in self._open.get(processor, {}).values()]
        for span_start, span_end, span_width in spans:  # one pass: each span adds to the cells it covers
            first = max(0, int((span_start - start) // width))
            last = min(cells - 1, int((min(span_end, now) - start) // width))
            for i in range(first, last + 1):
                cell_start = start + i * width
                busy[i] += span_width * max(0.0, min(span_end, cell_start + width) - max(span_start, cell_start))
        capacity = self.slots.get(processor, 1) * width
        return [min(1.0, b / capacity) for b in busy]

    def observe(self, event: object) -> bool:
        """Record a runtime subgraph event (its own measured times); False for other events."""
        if isinstance(event, SubgraphStarted):
            self.started(event.processor, event.id, event.t_start)
            return True
        if isinstance(event, SubgraphFinished):
            self._open[self._processor(event.processor)].pop(event.id, None)
            self.add_span(event.processor, event.id, event.t_start, event.t_end)
            return True
        return False


@dataclass(frozen=True)
class TimedEvent:
    """A runtime event and the span the engine spent computing it (inside `next()`)."""

    event: object
    busy_start: float
    busy_end: float


def timed_events(events: Iterable[object], clock=time.perf_counter, on_start=None) -> Iterator[TimedEvent]:
    """Wrap a synchronous engine's event stream, measuring the time spent producing each event.

    Valid for engines that compute inside the generator (the float engine): that time is the
    CPU executor's busy time. Not for a scheduler whose generator only waits on other threads.
    `on_start(t)` is called when the engine starts on the next event (to show it busy now).
    """
    iterator = iter(events)
    while True:
        start = clock()
        if on_start is not None:
            on_start(start)
        try:
            event = next(iterator)
        except StopIteration:
            return
        yield TimedEvent(event, start, clock())


@dataclass(frozen=True)
class ProcessSample:
    cpu_percent: float  # of one core: 200 means two cores fully busy
    rss_bytes: int
    cores: int  # logical CPUs this process may run on


class ProcessSampler:
    """This process's CPU use since the previous sample, and its resident memory (psutil)."""

    def __init__(self, pid: int | None = None):
        self._process = psutil.Process(pid)
        self._process.cpu_percent(None)  # starts the measurement interval
        try:
            self.cores = len(self._process.cpu_affinity())
        except (AttributeError, psutil.Error):
            self.cores = psutil.cpu_count() or 1

    def sample(self) -> ProcessSample:
        return ProcessSample(self._process.cpu_percent(None), self._process.memory_info().rss, self.cores)


@dataclass
class PrefillProgress:
    """Chunk k of N, tokens done and an ETA from the wall time the chunks so far took.

    Wall time (first `started_at`, then each chunk's commit) rather than the sum of
    `ChunkDone.seconds`: out of order, chunks overlap, and their own spans add up to more
    than the prefill took."""

    started_at: float = 0.0  # perf_counter when the prefill began
    chunks_done: int = 0
    n_chunks: int = 0
    tokens_done: int = 0
    elapsed: float = 0.0  # from started_at to the last chunk's commit

    def update(self, chunk: ChunkDone, now: float) -> None:
        self.chunks_done = chunk.index + 1
        self.n_chunks = chunk.n_chunks
        self.tokens_done += chunk.tokens
        self.elapsed = max(0.0, now - self.started_at)

    @property
    def eta_seconds(self) -> float | None:
        """Remaining chunks x mean wall time per chunk so far; None before the first chunk."""
        if self.chunks_done == 0:
            return None
        return (self.n_chunks - self.chunks_done) * self.elapsed / self.chunks_done

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens_done / self.elapsed if self.elapsed > 0 else None


@dataclass
class SessionMetrics:
    """Totals over the turns of one session (what `/stats` shows)."""

    turns: int = 0
    cancelled_turns: int = 0
    prefilled_tokens: int = 0
    reused_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_tokens: int = 0  # tokens after each turn's first (the decode rate's numerator)
    decode_seconds: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)

    def record(self, done: GenerationDone) -> None:
        self.turns += 1
        self.cancelled_turns += done.finish_reason == "cancelled"
        self.prefilled_tokens += done.prefilled_tokens
        self.reused_tokens += done.reused_tokens
        self.generated_tokens += done.generated_tokens
        m = done.metrics
        if m is None:
            return
        self.prefill_seconds += m.prefill_seconds
        if done.generated_tokens > 1:
            self.decode_tokens += done.generated_tokens - 1
            self.decode_seconds += m.decode_seconds
        if m.ttft_ms is not None:
            self.ttft_ms.append(m.ttft_ms)

    def record_prefill(self, done: GenerationDone) -> None:
        """A document prefill (context loaded without a reply): its prefill only."""
        self.prefilled_tokens += done.prefilled_tokens
        self.reused_tokens += done.reused_tokens
        if done.metrics is not None:
            self.prefill_seconds += done.metrics.prefill_seconds

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return (
            self.prefilled_tokens / self.prefill_seconds if self.prefilled_tokens and self.prefill_seconds > 0 else None
        )

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_seconds if self.decode_tokens and self.decode_seconds > 0 else None

    @property
    def mean_ttft_ms(self) -> float | None:
        return sum(self.ttft_ms) / len(self.ttft_ms) if self.ttft_ms else None
