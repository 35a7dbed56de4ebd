"""Stop strings over streamed text: never emit a stop string, even one split across tokens."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringFilter:
    """Feed text pieces; get back what is safe to show. Text that could be the start of a
    stop string is held back until it either completes one (generation stops, the stop string
    and anything after it are dropped) or can no longer be one (it is released)."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""  # held back: a suffix that is a prefix of some stop string
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add `piece`; returns the text that may be shown now. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        text = self.pending + piece
        first = None
        for s in self.stop:
            at = text.find(s)
            if at != -1 and (first is None or at < first):
                first = at
        if first is not None:
            self.stopped = True
            self.pending = ""
            return text[:first]
        hold = self._longest_stop_prefix_suffix(text)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """Release what is held back (generation ended for another reason)."""
        out, self.pending = self.pending, ""
        return "" if self.stopped else out

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
