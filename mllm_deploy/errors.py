"""Diagnostics and exit codes shared by every stage.

A stage that refuses user input raises :class:`UserError` carrying one or more
:class:`Diagnostic`; front ends print them (never a traceback) and exit with
``error.exit_code``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal, TypedDict, Unpack


class ExitCode(IntEnum):
    """Process exit codes of every `mllm-deploy` command."""

    OK = 0
    INTERNAL = 1
    INVALID = 2  # invalid profile, model file or usage
    CANNOT_RUN = 3  # valid profile that this device cannot run
    ACCURACY = 4  # `build --out`: the bundle's measured accuracy is over `[accuracy] max_ppl_ratio`
    INTERRUPTED = 130


class Location(TypedDict):
    """Where a diagnostic points: its `file`, `line`, `col` and dotted `key` (``**``-splat into
    :class:`Diagnostic`)."""

    file: str | None
    line: int | None
    col: int | None
    key: str | None


class DiagnosticFields(TypedDict, total=False):
    """The optional fields of a :class:`Diagnostic`, as keyword arguments of :func:`user_error`."""

    file: str | None
    line: int | None
    col: int | None
    key: str | None
    value: object
    allowed: str | None
    hint: str | None


@dataclass(frozen=True)
class Diagnostic:
    """One located message about user input."""

    message: str
    file: str | None = None
    line: int | None = None
    col: int | None = None
    key: str | None = None  # dotted profile key, e.g. "prefill.chunk_size"
    value: object = None  # the offending value, if any
    allowed: str | None = None  # what is allowed / the device limit
    hint: str | None = None  # e.g. "did you mean 'chunk_size'?"
    severity: Literal["error", "warning"] = "error"

    def location(self) -> str:
        if self.file is None:
            return ""
        if self.line is None:
            return self.file
        return f"{self.file}:{self.line}:{self.col or 1}"

    def render(self) -> str:
        """One diagnostic as text: `file:line:col: error: key: message (value ...; allowed ...)`."""
        head = self.location()
        parts = [f"{head}: " if head else "", f"{self.severity}: "]
        if self.key:
            parts.append(f"{self.key}: ")
        parts.append(self.message)
        out = "".join(parts)
        details = []
        if self.value is not None:
            details.append(f"got {self.value!r}")
        if self.allowed:
            details.append(f"allowed: {self.allowed}")
        if details:
            out += f" ({'; '.join(details)})"
        if self.hint:
            out += f"\n    hint: {self.hint}"
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "key": self.key,
            "value": self.value if isinstance(self.value, (str, int, float, bool, type(None))) else repr(self.value),
            "message": self.message,
            "allowed": self.allowed,
            "hint": self.hint,
        }


@dataclass
class UserError(Exception):
    """User input that cannot be used; carries every diagnostic found at once."""

    diagnostics: list[Diagnostic]
    exit_code: ExitCode = ExitCode.INVALID
    warnings: list[Diagnostic] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


def user_error(message: str, *, exit_code: ExitCode = ExitCode.INVALID, **where: Unpack[DiagnosticFields]) -> UserError:
    """Shorthand for a single-diagnostic :class:`UserError`."""
    return UserError([Diagnostic(message=message, **where)], exit_code=exit_code)
