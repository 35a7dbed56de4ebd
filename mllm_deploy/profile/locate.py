"""Where each key of a TOML document is written: dotted key -> (line, column), both 1-based.

`tomllib` parses but forgets positions, so this is a small, forgiving scanner over the same
text. It understands what profiles use: `[table]` and `[[array.of.tables]]` headers, dotted
and quoted keys, inline tables, arrays (also spanning lines), all four string forms and
comments. It never raises: on text it does not understand it skips to the next line, so it
can also be run on a document that `tomllib` rejected.

Keys are recorded at their first occurrence. Array items are recorded as `key.0`, `key.1`...;
tables of an array of tables as `key.0.sub`, `key.1.sub`...
"""

from __future__ import annotations

import bisect

_BARE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SCALAR_END = frozenset(",]}#\n")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "e": "\x1b"}


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
        self.found: dict[str, tuple[int, int]] = {}
        self.array_table_counts: dict[str, int] = {}

    # -- positions ---------------------------------------------------------------------
    def peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def line_col(self, pos: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.line_starts, pos)
        return line, pos - self.line_starts[line - 1] + 1

    def record(self, key: str, pos: int) -> None:
        self.found.setdefault(key, self.line_col(pos))

    # -- whitespace and comments ---------------------------------------------------------
    def skip_spaces(self) -> None:
        while self.peek() in (" ", "\t", "\r") and not self.at_end():
            self.pos += 1

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.text.find("\n", self.pos)
            self.pos = len(self.text) if end < 0 else end

    def skip_blank(self) -> None:
        """Spaces, newlines and comments (inside arrays and between statements)."""
        while not self.at_end():
            self.skip_spaces()
            self.skip_comment()
            if self.peek() == "\n":
                self.pos += 1
            else:
                return

    def skip_line(self) -> None:
        end = self.text.find("\n", self.pos)
        self.pos = len(self.text) if end < 0 else end + 1

    # -- keys --------------------------------------------------------------------------
    def key_part(self) -> tuple[str, int] | None:
        """One simple key (bare or quoted) and where it starts, or None."""
        start = self.pos
        quote = self.peek()
        if quote in ('"', "'"):
            value = self.quoted_string(quote)
            return (value, start) if value is not None else None
        while self.peek() in _BARE_KEY_CHARS and not self.at_end():
            self.pos += 1
        return (self.text[start : self.pos], start) if self.pos > start else None

    def dotted_key(self) -> list[tuple[str, int]] | None:
        parts = []
        while True:
            self.skip_spaces()
            part = self.key_part()
            if part is None:
                return None
            parts.append(part)
            self.skip_spaces()
            if self.peek() != ".":
                return parts
            self.pos += 1

    def record_parts(self, prefix: str, parts: list[tuple[str, int]]) -> str:
        key = prefix
        for name, start in parts:
            key = f"{key}.{name}" if key else name
            self.record(key, start)
        return key

    # -- strings -----------------------------------------------------------------------
    def quoted_string(self, quote: str) -> str | None:
        """A one-line string at `pos` (which is on its opening quote); None if unterminated."""
        self.pos += 1
        chars: list[str] = []
        while not self.at_end():
            ch = self.peek()
            if ch == "\n":
                return None
            if ch == quote:
                self.pos += 1
                return "".join(chars)
            if ch == "\\" and quote == '"':
                chars.append(self.escape())
                continue
            chars.append(ch)
            self.pos += 1
        return None

    def escape(self) -> str:
        """The character an escape sequence at `pos` stands for; moves past it."""
        code = self.peek(1)
        width = {"u": 4, "U": 8}.get(code, 0)
        digits = self.text[self.pos + 2 : self.pos + 2 + width]
        self.pos += 2 + width
        if width:
            try:
                char = chr(int(digits, 16))
            except ValueError:
                return ""
            return "\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char
        return _ESCAPES.get(code, code)

    def multiline_string(self, delimiter: str) -> None:
        self.pos += 3
        while not self.at_end():
            if delimiter == '"""' and self.peek() == "\\":
                self.pos += 2
                continue
            if self.text.startswith(delimiter, self.pos):
                self.pos += 3
                extra = 0
                while self.peek() == delimiter[0] and extra < 2:
                    self.pos += 1
                    extra += 1
                return
            self.pos += 1

    # -- values ------------------------------------------------------------------------
    def value(self, key: str) -> None:
        ch = self.peek()
        if self.text.startswith('"""', self.pos) or self.text.startswith("'''", self.pos):
            self.multiline_string(self.text[self.pos : self.pos + 3])
        elif ch in ('"', "'"):
            self.quoted_string(ch)
        elif ch == "[":
            self.array(key)
        elif ch == "{":
            self.inline_table(key)
        else:
            while not self.at_end() and self.peek() not in _SCALAR_END:
                self.pos += 1

    def array(self, key: str) -> None:
        self.pos += 1
        index = 0
        while not self.at_end():
            self.skip_blank()
            if self.peek() == "]":
                self.pos += 1
                return
            if self.peek() == ",":
                self.pos += 1
                continue
            start = self.pos
            item_key = f"{key}.{index}"
            self.record(item_key, start)
            self.value(item_key)
            index += 1
            if self.pos == start:  # not a value we understand: give up on this array
                return

    def inline_table(self, key: str) -> None:
        self.pos += 1
        while not self.at_end():
            self.skip_spaces()
            if self.peek() == "}":
                self.pos += 1
                return
            if self.peek() == ",":
                self.pos += 1
                continue
            parts = self.dotted_key()
            if parts is None or self.peek() != "=":
                return
            self.pos += 1
            self.skip_spaces()
            self.value(self.record_parts(key, parts))

    # -- statements --------------------------------------------------------------------
    def header(self, table: str) -> str:
        """A `[a.b]` or `[[a.b]]` header; returns the new current table prefix."""
        is_array = self.text.startswith("[[", self.pos)
        self.pos += 2 if is_array else 1
        parts = self.dotted_key()
        closing = "]]" if is_array else "]"
        if parts is None or not self.text.startswith(closing, self.pos):
            self.skip_line()
            return table
        self.pos += len(closing)
        key = self.record_parts("", parts)
        if is_array:
            count = self.array_table_counts.get(key, 0)
            self.array_table_counts[key] = count + 1
            key = f"{key}.{count}"
            self.record(key, parts[-1][1])
        return key

    def scan(self) -> dict[str, tuple[int, int]]:
        table = ""
        while not self.at_end():
            self.skip_blank()
            if self.at_end():
                break
            start = self.pos
            if self.peek() == "[":
                table = self.header(table)
            else:
                parts = self.dotted_key()
                if parts is not None and self.peek() == "=":
                    self.pos += 1
                    self.skip_spaces()
                    self.value(self.record_parts(table, parts))
            self.skip_spaces()
            self.skip_comment()
            if self.peek() != "\n" or self.pos == start:
                self.skip_line()
        return self.found


def locate_keys(text: str) -> dict[str, tuple[int, int]]:
    """Dotted key -> (line, column) of where the key is written in the TOML `text`."""
    scanner = _Scanner(text)
    try:
        return scanner.scan()
    except RecursionError:  # values nested hundreds deep: keep what was found before them
        return scanner.found
