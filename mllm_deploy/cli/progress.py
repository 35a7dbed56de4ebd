"""How the command line shows long steps: rich progress bars on a terminal, JSON progress events
on stderr otherwise, nothing with `--quiet`.

Every long step of the pipeline reports `stage, done, total` to the reporter installed with
`events.reporting` (`cli.main` installs the one `reporter_for(args)` chooses), so every command
shows calibration, graph builds, eval chunks or bench configurations the same way:

- stderr is a terminal, no `--json`: one rich bar per stage (k of N, elapsed, ETA); informational
  lines print above the bars.
- stderr is not a terminal, or `--json`: one JSON object per line on stderr,
  `{"event": "progress", "stage": str, "done": int, "total": int, "elapsed_s": float,
  "eta_s": float | null}`, at a stage's start, its end and at most once a second between
  (every event with `-v`); informational lines stay plain text. Data stays on stdout.
- `--quiet`: no progress and no informational lines (warnings and errors still print).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mllm_deploy.cli.common import verbosity

JSON_INTERVAL_S = 1.0  # at most one JSON event per stage per second between its start and its end


class QuietReporter:
    """`--quiet`: shows nothing."""

    def progress(self, stage: str, done: int, total: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Stage:
    def __init__(self, now: float, done: int) -> None:
        self.started = now
        self.first_done = done
        self.last_emit = float("-inf")


class JsonReporter:
    """One JSON progress event per line on `stream` (see the module docstring)."""

    def __init__(self, stream: TextIO, *, every_event: bool = False) -> None:
        self.stream = stream
        self.every_event = every_event
        self._stages: dict[str, _Stage] = {}
        self._lock = threading.Lock()

    def progress(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        with self._lock:
            state = self._stages.get(stage)
            if state is None or done < state.first_done:  # a stage that starts again is a new one
                state = self._stages[stage] = _Stage(now, done)
            end = done >= total
            if not (self.every_event or end or done == state.first_done or now - state.last_emit >= JSON_INTERVAL_S):
                return
            state.last_emit = now
            elapsed = now - state.started
            self.stream.write(
                json.dumps(progress_event(stage, done, total, elapsed, eta_seconds(state, done, total, elapsed))) + "\n"
            )
            self.stream.flush()
            if end:
                del self._stages[stage]

    def note(self, message: str) -> None:
        with self._lock:
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        pass


def progress_event(stage: str, done: int, total: int, elapsed_s: float, eta_s: float | None) -> dict[str, object]:
    """The JSON progress event (the format the module docstring documents)."""
    return {
        "event": "progress",
        "stage": stage,
        "done": done,
        "total": total,
        "elapsed_s": round(elapsed_s, 3),
        "eta_s": None if eta_s is None else round(eta_s, 1),
    }


def eta_seconds(state: _Stage, done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the stage's mean rate so far; None before the first unit is done."""
    if done >= total:
        return 0.0
    units = done - state.first_done
    if units <= 0 or elapsed <= 0:
        return None
    return (total - done) * elapsed / units


class TerminalReporter:
    """rich progress bars on a terminal: one per running stage; a finished stage's bar stays as a
    line with its time, and the live display stops when no stage runs (so a command's own output,
    such as streamed tokens, never mixes with a redrawn bar)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bars: Progress | None = None
        self._tasks: dict[str, tuple[TaskID, int]] = {}  # running stage -> its bar, units done
        self._lock = threading.Lock()

    def _open(self) -> Progress:
        if self._bars is None:
            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                refresh_per_second=4,
            )
            self._bars.start()
        return self._bars

    def progress(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            bars = self._open()
            running = self._tasks.get(stage)
            if running is None or done < running[1]:  # a stage that starts again gets a new bar
                task = bars.add_task(stage, total=max(total, 1), completed=done)
            else:
                task = running[0]
            self._tasks[stage] = (task, done)
            bars.update(task, completed=done, total=max(total, 1))
            if done >= total:
                bars.stop_task(task)
                del self._tasks[stage]
                if not self._tasks:
                    self._close()

    def note(self, message: str) -> None:
        with self._lock:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
            self._tasks.clear()


Reporter = QuietReporter | JsonReporter | TerminalReporter


def reporter_for(args: argparse.Namespace, stream: TextIO | None = None) -> Reporter:
    """The reporter the command line's options ask for (see the module docstring)."""
    stream = stream if stream is not None else sys.stderr
    level = verbosity(args)
    if level < 0:
        return QuietReporter()
    if getattr(args, "json", False) or not stream.isatty():
        return JsonReporter(stream, every_event=level > 0)
    return TerminalReporter(Console(file=stream, stderr=stream is sys.stderr))
