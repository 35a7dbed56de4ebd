"""Plain events the runtime emits while it works; front ends (CLI, TUI) consume them.

Only data here, and one hook: the progress reporter a front end installs (`reporting`) so that
every long step (calibration, graph build, eval, ...) reports `stage, done of total` and its
informational lines to it, wherever in the pipeline it runs. No front-end imports.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "eos", "length", "cancelled", "context"]


@dataclass(frozen=True)
class ChunkDone:
    """One prefill chunk went through every layer."""

    index: int  # 0-based chunk number within this prefill
    n_chunks: int
    tokens: int  # real tokens in the chunk
    seconds: float  # wall time of the chunk


@dataclass(frozen=True)
class PrefillDone:
    """The prompt is in the KV cache (or prefill was cancelled)."""

    prompt_tokens: int  # tokens of the whole prompt (conversation so far)
    reused_tokens: int  # already in the KV cache from an earlier turn
    prefilled_tokens: int  # computed now: prompt_tokens - reused_tokens (fewer if cancelled)
    truncated_tokens: int  # oldest tokens dropped by prefill.overflow = truncate-left
    seconds: float
    cancelled: bool = False


@dataclass(frozen=True)
class TokenEmitted:
    """A generated token; `text` is what it adds to the visible output (may be empty while a
    UTF-8 character or a possible stop string is incomplete)."""

    index: int  # 0-based among generated tokens
    token_id: int
    text: str
    seconds_since_start: float  # since the request started (first token: the TTFT)


@dataclass(frozen=True)
class GenerationMetrics:
    ttft_ms: float | None  # request start to first generated token
    prefill_seconds: float
    prefill_tokens_per_s: float | None
    decode_seconds: float  # first token to last token
    decode_tokens_per_s: float | None  # tokens after the first / decode_seconds


@dataclass(frozen=True)
class GenerationDone:
    """A turn finished; carries the whole result."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    truncated_tokens: int
    generated_tokens: int
    token_ids: list[int] = field(default_factory=list)
    metrics: GenerationMetrics | None = None


@dataclass(frozen=True)
class SubgraphStarted:
    """A prefill subgraph began on a processor (emitted by the DAG prefill executors)."""

    id: str  # plan subgraph id, e.g. "c2.L7.gate_up"
    processor: str  # "npu" or "cpu"
    chunk: int
    layer: int
    kind: str
    t_start: float  # time.perf_counter() seconds

    @property
    def t(self) -> float:
        """When it happened (what telemetry reads)."""
        return self.t_start


@dataclass(frozen=True)
class SubgraphFinished:
    """A prefill subgraph finished; carries its measured busy interval."""

    id: str
    processor: str
    chunk: int
    layer: int
    kind: str
    t_start: float  # time.perf_counter() seconds
    t_end: float

    @property
    def t(self) -> float:
        """When it happened (what telemetry reads)."""
        return self.t_end


Event = ChunkDone | PrefillDone | TokenEmitted | GenerationDone
"""What `generate()` yields for one turn (GenerationDone always last)."""

SubgraphEvent = SubgraphStarted | SubgraphFinished
"""What the NPU path's executors report about each subgraph."""

TurnEvent = Event | SubgraphEvent
"""What a session's turn yields to front ends: generation events with subgraph events interleaved."""


class ProgressReporter(Protocol):
    """What a front end shows of long steps (cli/progress.py: a terminal's bars, JSON lines, or
    nothing; the TUI: its loading line). Called from any thread."""

    def progress(self, stage: str, done: int, total: int) -> None:
        """`done` of `total` units of `stage` are done (0 at its start, `total` at its end)."""

    def note(self, message: str) -> None:
        """An informational line (what was built, where, how long it took)."""


_reporter: list[ProgressReporter] = []  # the installed one, last; a list so no `global` is needed


def current_reporter() -> ProgressReporter | None:
    """The reporter a front end installed, or None (a library caller: nothing is shown)."""
    return _reporter[-1] if _reporter else None


@contextmanager
def reporting(reporter: ProgressReporter) -> Iterator[ProgressReporter]:
    """Install `reporter` for the duration of the block (nested blocks: the innermost wins)."""
    _reporter.append(reporter)
    try:
        yield reporter
    finally:
        _reporter.remove(reporter)


def report_progress(stage: str, done: int, total: int) -> None:
    """Tell the installed reporter, if any, that `done` of `total` units of `stage` are done."""
    reporter = current_reporter()
    if reporter is not None:
        reporter.progress(stage, done, total)


def report_note(message: str) -> None:
    """An informational line to the installed reporter (nothing shown with `--quiet`), else stderr."""
    reporter = current_reporter()
    if reporter is not None:
        reporter.note(message)
    else:
        print(message, file=sys.stderr, flush=True)
