"""The conversation: one widget per message; streamed tokens append to the current one only."""

from __future__ import annotations

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

ROLE_TITLES = {"user": "You", "assistant": "Assistant", "note": "", "error": "Error"}


class MessageView(Static):
    """One message. An assistant reply grows token by token through :meth:`append`."""

    DEFAULT_CSS = """
    MessageView { padding: 0 1; margin: 0 0 1 0; }
    MessageView.user { background: $boost; }
    MessageView.note { color: $text-muted; margin: 0; }
    MessageView.metrics { color: $text-muted; margin: 0 0 1 0; }
    MessageView.error { color: $error; }
    """

    def __init__(self, role: str, text: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.role = role
        self.add_class(role)
        self._parts: list[str] = [text] if text else []

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def on_mount(self) -> None:
        self._render_text()

    def append(self, piece: str) -> None:
        if piece:
            self._parts.append(piece)
            self._render_text()

    def _render_text(self) -> None:
        title = ROLE_TITLES.get(self.role, "")
        content = Text()
        if title:
            content.append(f"{title}: ", style="bold")
        content.append(self.text or ("…" if self.role == "assistant" else ""))
        self.update(content)


class Transcript(VerticalScroll):
    """Messages in order; stays scrolled to the newest while the user has not scrolled away."""

    DEFAULT_CSS = """
    Transcript { height: 1fr; scrollbar-size-vertical: 1; }
    """

    def on_mount(self) -> None:
        self.anchor()

    def add(self, role: str, text: str = "") -> MessageView:
        view = MessageView(role, text)
        self.mount(view)
        return view

    def clear(self) -> None:
        self.remove_children()

    def texts(self) -> list[str]:
        """Every message's text, for tests and saving."""
        return [child.text for child in self.children if isinstance(child, MessageView)]
