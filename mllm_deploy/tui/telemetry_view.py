"""What the telemetry panel shows, computed from measured spans and samples. No textual here."""

from __future__ import annotations

from dataclasses import dataclass, field

from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.runtime.telemetry import ProcessSample, UtilizationTracker
from mllm_deploy.tui.formatting import process_line

BUSY_WINDOW_SECONDS = 1.0  # utilization % = busy fraction over the last second
LANE_SECONDS = 9.0  # the lane shows the last 9 s, one cell per half second
LANE_CELLS = 18
HISTORY_POINTS = 64
ENGINE_SPAN = "engine"  # the float engine's single executor (its spans carry no subgraph id)


@dataclass
class ProcessorRow:
    name: str  # "npu" / "cpu"
    present: bool  # False: this deployment has no such executor (e.g. no NPU backend)
    busy: float = 0.0  # busy fraction over the last window
    history: list[float] = field(default_factory=list)  # busy fraction per refresh, oldest first
    lane: list[float] = field(default_factory=list)  # busy fraction per time slice of the lane window
    activity: str = ""  # what runs now, e.g. "c3.L12.gate_up" or "chunk 3/16"
    absent_text: str = ""


@dataclass
class TelemetryState:
    title: str  # e.g. "NPU · ort-cpu emulation (AMX INT8) · CPU · 1 thread(s)"
    rows: list[ProcessorRow]
    process: str = ""
    progress: str = ""
    last_turn: str = "no turn yet"


def telemetry_state(
    deployment: Deployment,
    tracker: UtilizationTracker,
    histories: dict[str, list[float]],
    *,
    add_point: bool,
    now: float,
    activity: str,
    progress: str,
    process: ProcessSample | None,
    last_turn: str,
) -> TelemetryState:
    """Rows for NPU and CPU (busy %, history, lane, what runs) plus process and progress lines.

    `histories` gets one new point per processor when `add_point` (once per ui.refresh_hz tick).
    """
    resolved = deployment.resolved
    rows = []
    for name, present in (("npu", resolved.uses_npu), ("cpu", True)):
        row = ProcessorRow(name, present, absent_text=f"idle · {resolved.backend_label}: no NPU executor")
        if present:
            row.busy = tracker.busy_fraction(name, now, BUSY_WINDOW_SECONDS)
            history = histories.setdefault(name, [])
            if add_point:
                history.append(row.busy)
                del history[:-HISTORY_POINTS]
            row.history = history
            row.lane = tracker.lane(name, now, LANE_SECONDS, LANE_CELLS)
            row.activity = _activity(tracker, name, now, activity if name == "cpu" else "")
        rows.append(row)
    return TelemetryState(
        title=f"{deployment.npu_label} · {deployment.cpu_label}",
        rows=rows,
        process=process_line(process),
        progress=progress,
        last_turn=last_turn,
    )


def _activity(tracker: UtilizationTracker, processor: str, now: float, fallback: str) -> str:
    """The subgraphs running on `processor`, else the one that just finished, else `fallback`."""
    running = [label for label in tracker.running(processor) if label != ENGINE_SPAN]
    if running:
        return ", ".join(running[-2:]) + (f" (+{len(running) - 2})" if len(running) > 2 else "")
    last = tracker.last_finished(processor)
    if last is not None and last.label != ENGINE_SPAN and now - last.end < BUSY_WINDOW_SECONDS:
        return last.label
    return fallback
