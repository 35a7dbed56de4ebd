"""The plan view: resolved profile, placement grid and the execution plan (F2 / Esc to return)."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.tui.plan_text import plan_view_text


def _colored_processors(text: str) -> Text:
    out = Text(text)
    out.highlight_words(["NPU"], style="bold magenta")
    out.highlight_words(["CPU"], style="cyan")
    return out


class PlanScreen(Screen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,f2", "app.pop_screen", "Back to chat"),
    ]
    DEFAULT_CSS = """
    PlanScreen VerticalScroll { padding: 0 1; }
    PlanScreen Static { margin: 0 0 1 0; }
    """

    def __init__(self, deployment: Deployment) -> None:
        super().__init__()
        self.deployment = deployment

    def compose(self) -> ComposeResult:
        summary, grid, profile, plan = plan_view_text(self.deployment)
        yield Header()
        with VerticalScroll(id="plan-scroll"):
            yield Static(Text(summary), id="plan-summary")
            yield Static(_colored_processors(grid), id="plan-grid")
            yield Static(Text(profile), id="plan-profile")
            yield Static(Text(plan), id="plan-text")
        yield Footer()

    def on_mount(self) -> None:
        self.title = f"Plan · {self.deployment.profile.name}"
        self.sub_title = self.deployment.npu_label
