"""Live utilization: a line per processor (busy bar, %, sparkline history, timeline lane, what runs),
the process's CPU % and RSS, prefill progress and the last turn's metrics."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from mllm_deploy.tui.formatting import bar, lane, sparkline
from mllm_deploy.tui.telemetry_view import TelemetryState

BAR_WIDTH = 10
SPARK_WIDTH = 14
LANE_WIDTH = 18
PROCESSOR_STYLES = {"npu": "magenta", "cpu": "cyan"}


class TelemetryPanel(Static):
    DEFAULT_CSS = """
    TelemetryPanel {
        height: auto;
        border: round $primary-darken-2;
        border-title-color: $text;
        padding: 0 1;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    def show(self, state: TelemetryState) -> None:
        self.border_title = state.title
        lines = Text()
        for row in state.rows:
            style = PROCESSOR_STYLES.get(row.name, "white")
            lines.append(f"{row.name.upper():<4}", style=f"bold {style}")
            if not row.present:
                lines.append(row.absent_text, style="dim")
            else:
                lines.append(bar(row.busy, BAR_WIDTH), style=style)
                lines.append(f" {row.busy * 100:>3.0f}% ")
                lines.append(sparkline(row.history[-SPARK_WIDTH:]).ljust(SPARK_WIDTH), style=style)
                lines.append(" │")
                lines.append(lane(row.lane[-LANE_WIDTH:]).ljust(LANE_WIDTH), style=style)
                lines.append("│ ")
                lines.append(row.activity or "idle", style="bold" if row.activity else "dim")
            lines.append("\n")
        lines.append(state.process)
        lines.append("\n")
        if state.progress:  # while loading or working: the progress; otherwise the last turn's metrics
            lines.append(state.progress, style="bold")
        else:
            lines.append(state.last_turn, style="dim")
        self.update(lines)
