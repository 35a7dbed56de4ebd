"""Reading a profile file and parsing its TOML, every failure a located diagnostic."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from mllm_deploy.errors import Diagnostic, UserError
from mllm_deploy.profile.loaded import display_key
from mllm_deploy.profile.locate import locate_keys

MAX_PROFILE_BYTES = 1_000_000
_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")
_BARE_WORD_VALUE = re.compile(r"""^\s*([A-Za-z0-9_.\-"']+)\s*=\s*([A-Za-z][A-Za-z0-9_.:/+\-]*)\s*(#.*)?$""")
_TOML_WORDS = {"true", "false", "inf", "nan"}


def printable(text: str) -> str:
    """`text` without lone surrogates, safe to print: an undecodable byte of a file name or an
    argument (which Python holds as a surrogate) is shown as `\\xNN`."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _fail(
    message: str, file: str, *, line: int | None = None, col: int | None = None, hint: str | None = None
) -> UserError:
    return UserError([Diagnostic(message=message, file=file, line=line, col=col, hint=hint)])


def read_profile_text(path: Path, display: str) -> str:
    """The UTF-8 text of the profile file at `path`; `display` names it in diagnostics."""
    try:
        if path.is_dir():
            raise _fail("is a directory, not a profile file", display, hint="give the path of a .toml file")
        with path.open("rb") as handle:
            data = handle.read(MAX_PROFILE_BYTES + 1)
    except FileNotFoundError:
        raise _fail("no such profile file", display, hint="create one with `mllm-deploy init PATH`") from None
    except PermissionError:
        raise _fail("cannot read the profile file: permission denied", display) from None
    except OSError as exc:
        raise _fail(f"cannot read the profile file: {exc.strerror or exc}", display) from None
    if len(data) > MAX_PROFILE_BYTES:
        raise _fail(f"profile file is larger than {MAX_PROFILE_BYTES} bytes; is it really a profile?", display)
    return decode_profile_bytes(data, display)


def _line_col_of_byte(data: bytes, offset: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, offset) + 1
    prefix = data[line_start:offset].decode("utf-8", errors="replace")
    return data.count(b"\n", 0, offset) + 1, len(prefix) + 1


def decode_profile_bytes(data: bytes, display: str) -> str:
    """Text of a profile's bytes: UTF-8 (a leading BOM is dropped), no NUL bytes."""
    if b"\x00" in data:
        line, col = _line_col_of_byte(data, data.index(b"\x00"))
        raise _fail("not a text file (contains NUL bytes); a profile is UTF-8 TOML text", display, line=line, col=col)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, col = _line_col_of_byte(data, exc.start)
        raise _fail(
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x}); a profile is UTF-8 TOML text",
            display,
            line=line,
            col=col,
            hint="re-save the file as UTF-8",
        ) from None


def _syntax_hint(reason: str, source_line: str) -> str | None:
    if "illegal character '\\n'" in reason.lower():
        return "a string is not closed on this line (use triple quotes for text spanning lines)"
    match = _BARE_WORD_VALUE.match(source_line)
    if match and match.group(2).lower() not in _TOML_WORDS:
        key, word = match.group(1), match.group(2)
        return f'strings need quotes in TOML: {key} = "{word}"'
    return None


def toml_syntax_diagnostic(exc: tomllib.TOMLDecodeError, text: str, display: str) -> Diagnostic:
    """A located diagnostic for a TOML syntax error (tomllib puts the position in its message)."""
    message = str(exc)
    match = _TOML_POSITION.search(message)
    lines = text.split("\n")
    if match and match.group(1):
        line, col = int(match.group(1)), int(match.group(2))
    else:  # "at end of document", or a message format we do not know
        while len(lines) > 1 and not lines[-1].strip():
            lines.pop()
        line, col = len(lines), len(lines[-1]) + 1
    reason = message[: match.start()] if match else message
    source_line = lines[line - 1] if 0 < line <= len(lines) else ""
    on_line = [key for key, (key_line, _) in locate_keys(text).items() if key_line == line]
    return Diagnostic(
        message=f"invalid TOML: {reason[:1].lower()}{reason[1:]}",
        file=display,
        line=line,
        col=col,
        key=display_key(max(on_line, key=len)) if on_line else None,
        hint=_syntax_hint(reason, source_line),
    )


def parse_toml(text: str, display: str) -> dict[str, object]:
    """The TOML document `text` as a dict; a syntax error raises a located UserError."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError([toml_syntax_diagnostic(exc, text, display)]) from None
    except RecursionError:
        raise _fail("invalid TOML: arrays or tables nested too deeply", display) from None
    except ValueError as exc:  # e.g. a number tomllib cannot hold
        raise _fail(f"invalid TOML: {exc}", display) from None
