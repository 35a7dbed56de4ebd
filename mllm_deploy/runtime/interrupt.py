"""Ctrl-C as a cancel request: the first SIGINT sets an Event that generation checks between
prefill chunks and between tokens (so the partial result survives); a second one raises
KeyboardInterrupt as usual."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def sigint_cancels(cancel: threading.Event):
    """Within the block, SIGINT sets `cancel` (the second SIGINT interrupts for real).

    Only the main thread may install signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)
