"""The real `mllm-deploy up` under a pseudo-terminal: ask, see "Paris" on screen, Ctrl+Q, exit 0."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ANSI = re.compile(rb"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")
ROWS, COLUMNS = 30, 100


class Terminal:
    """A child process on a pty; `screen_stream` is everything it drew, escape sequences removed."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, close_fds=True
        )
        os.close(slave)
        self.master = master
        self.raw = b""

    def read_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                self.raw += chunk

    @property
    def screen_stream(self) -> str:
        return ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen_stream:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"{text!r} never appeared; last output:\n{self.screen_stream[-3000:]}")
            self.read_for(0.2)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


def test_up_in_a_terminal_answers_and_quits_with_ctrl_q(tmp_path):
    executable = Path(sys.executable).with_name("mllm-deploy")
    env = {
        **os.environ,
        "TERM": "xterm-256color",
        "MLLM_DEPLOY_DATA": str(tmp_path),
        "COLUMNS": str(COLUMNS),
        "LINES": str(ROWS),
    }
    terminal = Terminal([str(executable), "up", "--set", "device.npu_backend=none"], env)
    try:
        terminal.wait_for("model ready", timeout=240)
        terminal.type("What is the capital of France?")
        terminal.wait_for("France?", timeout=30)  # keys echo in the input
        terminal.type("\r")
        terminal.wait_for("Paris", timeout=240)
        terminal.wait_for("TTFT", timeout=60)
        terminal.type("\x11")  # Ctrl+Q
        assert terminal.process.wait(timeout=60) == 0
        terminal.read_for(0.2)
    finally:
        terminal.close()
    assert "Traceback" not in terminal.screen_stream
