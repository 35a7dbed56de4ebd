"""A validated profile together with where each of its keys came from."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mllm_deploy.errors import Diagnostic, Location
from mllm_deploy.profile.models import Profile

_INDEX = re.compile(r"\[(\d+)\]")


def normalise_key(key: str | Sequence[object] | None) -> str:
    """`decode.stop[0]` / ("decode", "stop", 0) -> `decode.stop.0`."""
    if key is None:
        return ""
    if not isinstance(key, str):
        key = ".".join(str(part) for part in key)
    return _INDEX.sub(r".\1", key.strip()).strip(".")


def display_key(key: str | Sequence[object]) -> str:
    """(`decode`, `stop`, 0) or `decode.stop.0` -> `decode.stop[0]` (how users write it)."""
    parts = list(key) if not isinstance(key, str) else normalise_key(key).split(".")
    out = ""
    for part in parts:
        text = str(part)
        if isinstance(part, int) or text.isdigit():
            out += f"[{text}]"
        else:
            out += f".{text}" if out else text
    return out


def override_key(override: str) -> str:
    """The dotted key of a `KEY=VALUE` override (whatever is left of the first `=`)."""
    return normalise_key(override.split("=", 1)[0].replace(" ", ""))


def locate(
    key: str | Sequence[object] | None,
    *,
    file: str | None,
    locations: Mapping[str, tuple[int, int]],
    overrides: Sequence[str] = (),
) -> Location:
    """Diagnostic kwargs (`file`, `line`, `col`, `key`) saying where dotted `key` was set.

    Order: the last `--set` that set the key (or a section holding it); the key in the file;
    its nearest enclosing section in the file; a `--set` of a key inside it; the file itself.
    """
    dotted = normalise_key(key)
    shown = display_key(dotted) if dotted else None
    for override in reversed(overrides):
        set_key = override_key(override)
        if set_key and (dotted == set_key or dotted.startswith(set_key + ".")):
            return {"file": f"--set {override}", "line": None, "col": None, "key": shown}
    parts = dotted.split(".") if dotted else []
    while parts:
        found = locations.get(".".join(parts))
        if found is not None:
            return {"file": file, "line": found[0], "col": found[1], "key": shown}
        parts.pop()
    for override in reversed(overrides):
        if dotted and override_key(override).startswith(dotted + "."):
            return {"file": f"--set {override}", "line": None, "col": None, "key": shown}
    return {"file": file, "line": None, "col": None, "key": shown}


@dataclass(frozen=True)
class LoadedProfile:
    """A valid profile, the file it came from, and where each key is written."""

    profile: Profile
    path: Path | None  # the file read (for the built-in default: its profiles/default.toml)
    base_dir: Path  # absolute; relative paths inside the profile are relative to it
    locations: dict[str, tuple[int, int]]  # dotted key -> (line, col) in the file; sections too
    explicit: frozenset[str]  # dotted leaf keys set in the file or by --set (not defaults)
    overrides: tuple[str, ...] = ()  # the --set KEY=VALUE strings, in order
    warnings: list[Diagnostic] = field(default_factory=list)
    text_hash: str = ""  # sha256 of the effective profile as canonical JSON

    @property
    def display_path(self) -> str | None:
        """How the profile file is named in diagnostics."""
        return str(self.path) if self.path is not None else None

    def is_explicit(self, key: str) -> bool:
        """Whether `key` (or, for a section, any key in it) was set rather than defaulted."""
        dotted = normalise_key(key)
        return dotted in self.explicit or any(k.startswith(dotted + ".") for k in self.explicit)

    def where(self, key: str | Sequence[object] | None) -> Location:
        """Diagnostic kwargs `file`, `line`, `col`, `key` for dotted `key` (see :func:`locate`).

        Never raises: unknown keys fall back to their nearest enclosing section, then to the
        file with no line. Use as `Diagnostic(message=..., **loaded.where("prefill.chunk_size"))`.
        """
        return locate(key, file=self.display_path, locations=self.locations, overrides=self.overrides)
