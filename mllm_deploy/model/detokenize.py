"""Streaming detokenization: feed ids one at a time, get back only complete text.

A character may span tokens (byte-level BPE splits emoji and CJK into byte tokens;
SentencePiece byte-fallback tokens are single bytes). The decoder keeps a short window of
ids, decodes it, and releases text only when it does not end in an unfinished UTF-8
sequence (which `tokenizers` decodes as U+FFFD). Decoding a window that starts just after
released text keeps context-dependent decoders (SentencePiece's leading space) right, so
the concatenation of everything returned (plus `finish()`) equals `decode(all ids)`.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
MAX_PENDING = 16  # ids held back at most; a longer run of undecodable bytes is released as U+FFFD


class Decoder(Protocol):
    """What StreamDecoder needs of a tokenizer (a ModelTokenizer has it)."""

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str: ...


class StreamDecoder:
    """Incremental decoder over a ModelTokenizer (anything with `decode(ids, skip_special=)`)."""

    def __init__(self, tokenizer: Decoder, *, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window: ids already released, kept for context
        self._read = 0  # ids before this index have been released as text
        self._emitted: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, token_id: int) -> str:
        """Add one id; returns the newly completed text (often "", never half a character)."""
        self.ids.append(int(token_id))
        released = self._decode(self.ids[self._prefix : self._read])
        current = self._decode(self.ids[self._prefix :])
        pending = len(self.ids) - self._read
        complete = not current.endswith(REPLACEMENT) or pending >= MAX_PENDING
        if len(current) > len(released) and complete and current.startswith(released):
            self._prefix, self._read = self._read, len(self.ids)
            return self._emit(current[len(released) :])
        if pending >= MAX_PENDING:  # the window does not extend its own prefix: resynchronise
            return self._resync()
        return ""

    def finish(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD)."""
        return self._resync()

    def _emit(self, piece: str) -> str:
        self._emitted.append(piece)
        return piece

    def _resync(self) -> str:
        """Release the difference between decode(all ids) and what was already released."""
        full, emitted = self._decode(self.ids), "".join(self._emitted)
        self._prefix = self._read = len(self.ids)
        return self._emit(full[len(emitted) :]) if full.startswith(emitted) else ""

    def text(self) -> str:
        """decode(all ids so far): the reference the streamed pieces add up to."""
        return self._decode(self.ids)
