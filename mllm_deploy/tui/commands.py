"""Slash commands typed into the input (`/set decode.temperature=0.7`): parsing and help text."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from mllm_deploy.errors import Diagnostic, UserError


@dataclass(frozen=True)
class CommandInfo:
    name: str
    argument: str  # how the argument is written in help ("" for none)
    summary: str
    needs_argument: bool = False


COMMANDS: tuple[CommandInfo, ...] = (
    CommandInfo("help", "", "show commands and key bindings"),
    CommandInfo("load", "FILE", "prefill a text file as context, then ask about it", needs_argument=True),
    CommandInfo("set", "KEY=VALUE", "change a profile key (re-validated; says what is rebuilt)", needs_argument=True),
    CommandInfo("reset", "", "start a new conversation (empties the KV cache)"),
    CommandInfo("stats", "", "metrics of this session so far"),
    CommandInfo("plan", "", "show the resolved profile and execution plan (F2)"),
    CommandInfo("save", "[NAME]", "save the transcript (markdown + session file to reopen)"),
    CommandInfo(
        "open", "NAME", "reopen a saved session (its conversation is prefilled on the next turn)", needs_argument=True
    ),
    CommandInfo("sessions", "", "list saved sessions"),
    CommandInfo("quit", "", "leave (Ctrl+Q)"),
)
COMMANDS_BY_NAME = {c.name: c for c in COMMANDS}

KEY_BINDINGS: tuple[tuple[str, str], ...] = (
    ("Enter", "send the message or command"),
    ("Up / Down", "previous / next input from history"),
    ("Esc", "cancel the running reply or document prefill"),
    ("F1", "help"),
    ("F2", "plan view (Esc or F2 returns)"),
    ("Ctrl+S", "save the session"),
    ("Ctrl+R", "new conversation"),
    ("Ctrl+P", "command palette"),
    ("Ctrl+Q", "quit"),
)


@dataclass(frozen=True)
class SlashCommand:
    name: str
    argument: str


def parse_command(line: str) -> SlashCommand | None:
    """The command in `line`, None when it is a chat message; UserError for an unknown command."""
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, argument = text[1:].partition(" ")
    name = name.lower()
    info = COMMANDS_BY_NAME.get(name)
    if info is None:
        close = difflib.get_close_matches(name, list(COMMANDS_BY_NAME), n=1)
        hint = f"did you mean /{close[0]}?" if close else "type /help for the list"
        raise UserError([Diagnostic(message=f"unknown command /{name}", hint=hint)])
    argument = argument.strip()
    if info.needs_argument and not argument:
        raise UserError(
            [Diagnostic(message=f"/{name} needs {info.argument}", hint=f"/{name} {info.argument}: {info.summary}")]
        )
    return SlashCommand(name, argument)


def help_text() -> str:
    lines = ["Commands:"]
    lines += [f"  /{c.name} {c.argument}".ljust(24) + c.summary for c in COMMANDS]
    lines.append("Keys:")
    lines += [f"  {key}".ljust(24) + what for key, what in KEY_BINDINGS]
    lines.append("A line starting with // is sent as a message beginning with /.")
    return "\n".join(lines)


def chat_text(line: str) -> str:
    """The message to send for a non-command line (`//x` sends `/x`)."""
    text = line.strip()
    return text[1:] if text.startswith("//") else text
