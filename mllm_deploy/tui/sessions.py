"""Saved sessions: `<data dir>/sessions/NAME.json` (to reopen) and `NAME.md` (to read).

A session file records the profile argument, overrides and opt-in (`--emulate` / `--simulator`)
it ran with, the conversation
(user/assistant messages, documents included in the user messages that carried them) and a
document loaded but not asked about yet.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

from mllm_deploy.device.host import OptIn
from mllm_deploy.errors import Diagnostic, UserError
from mllm_deploy.paths import atomic_write_text, data_dir

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FORMAT_VERSION = 1


@dataclass
class SavedSession:
    name: str
    profile: str | None
    overrides: list[str]
    messages: list[dict]
    pending_document: dict | None = None  # {"path": ..., "message": ...} loaded but not asked about
    saved_at: str = ""
    format_version: int = FORMAT_VERSION
    notes: list[str] = field(default_factory=list)
    opt_in: OptIn | None = None  # "emulate" / "simulator": how a Hexagon target ran here (files before it: None)


def sessions_dir() -> Path:
    path = data_dir() / "sessions"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_session_name() -> str:
    return time.strftime("session-%Y%m%d-%H%M%S")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise UserError([Diagnostic(
            message="a session name is letters, digits, '.', '_' or '-' (at most 100, not starting with a symbol)",
            value=name,
        )])  # fmt: skip
    return name


def saved_names() -> list[str]:
    return sorted(p.stem for p in sessions_dir().glob("*.json"))


def save_session(session: SavedSession) -> tuple[Path, Path]:
    """Write NAME.json and NAME.md atomically; returns (json path, markdown path)."""
    check_name(session.name)
    session.saved_at = time.strftime("%Y-%m-%d %H:%M:%S")
    folder = sessions_dir()
    json_path, md_path = folder / f"{session.name}.json", folder / f"{session.name}.md"
    atomic_write_text(json_path, json.dumps(asdict(session), indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(md_path, transcript_markdown(session))
    return json_path, md_path


def load_session(name: str) -> SavedSession:
    """The saved session NAME; UserError (exit 2) naming the saved ones when it is missing or broken."""
    check_name(name)
    path = sessions_dir() / f"{name}.json"
    if not path.is_file():
        names = saved_names()
        raise UserError([Diagnostic(
            message=f"no saved session named {name!r}",
            file=str(path),
            allowed=", ".join(names) if names else "none saved yet (/save NAME in `mllm-deploy up`)",
        )])  # fmt: skip
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')!r}, this release reads {FORMAT_VERSION}")
        session = SavedSession(**data)
        if not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in session.messages
        ):
            raise ValueError("messages must be user/assistant objects with text content")
        if session.opt_in not in (None, *get_args(OptIn)):
            raise ValueError(f"opt_in {session.opt_in!r} is none of {', '.join(get_args(OptIn))}")
    except (OSError, ValueError, TypeError) as exc:
        raise UserError([Diagnostic(message=f"cannot read the saved session: {exc}", file=str(path))]) from None
    return session


def transcript_markdown(session: SavedSession) -> str:
    profile = session.profile or "built-in default profile"
    lines = [f"# mllm-deploy session {session.name}", "", f"- profile: {profile}"]
    if session.overrides:
        lines.append("- overrides: " + " ".join(f"`--set {o}`" for o in session.overrides))
    if session.saved_at:
        lines.append(f"- saved: {session.saved_at}")
    lines.append("")
    for message in session.messages:
        who = "You" if message["role"] == "user" else "Assistant"
        lines += [f"## {who}", "", message["content"].rstrip(), ""]
    if session.pending_document:
        lines += [f"## Document loaded (not asked about yet): {session.pending_document.get('path', '')}", ""]
    return "\n".join(lines)
