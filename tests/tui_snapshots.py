"""Text snapshots of the `up` app's screen, compared with goldens in tests/__snapshots__/tui/
(volatile numbers and glyphs masked); written only by `pytest --update-goldens` (tests/goldens.py)."""

from __future__ import annotations

import re
from pathlib import Path

from goldens import changed_message, golden_text

from mllm_deploy.tui.app import DeployApp
from mllm_deploy.tui.capture import screen_text

GOLDEN_DIR = Path(__file__).parent / "__snapshots__" / "tui"
VOLATILE_GLYPHS = re.compile(r"[▁▂▃▄▅▆▇█▏▎▍▌▋▊▉░▒▓]")


def masked(app: DeployApp) -> str:
    """The screen with what varies from run to run removed: numbers, bar/sparkline/lane glyphs,
    the profile file's path, and runs of spaces (bar widths change alignment)."""
    text = screen_text(app)
    path = app.deployment.loaded.display_path
    if path:
        text = text.replace(path, "<profile>")
    text = re.sub(r"\d[\d.,]*\s*(ms|s)\b", "#", VOLATILE_GLYPHS.sub("", text))  # 840 ms / 1.2 s: unit varies
    text = re.sub(r"\d[\d.,]*", "#", text)
    return "\n".join(re.sub(r" {2,}", " ", line).rstrip() for line in text.splitlines()) + "\n"


def _comparable(text: str) -> str:
    """No whitespace; and a notification toast may cover the end of the RSS figure's unit
    (how much depends on the figure's width), so `RSS # MB` / `RSS # M` compare equal."""
    return re.sub(r"RSS#M?B?", "RSS#", "".join(text.split()))


def _same(golden: str, actual: str) -> bool:
    return _comparable(golden) == _comparable(actual)


def check_golden(name: str, text: str, update: bool, golden_dir: Path = GOLDEN_DIR) -> None:
    """Compare with the committed golden with all whitespace removed: a number's width moves
    where a long line wraps and how much padding a lane gets. A missing golden fails."""
    expected = golden_text(golden_dir / f"{name}.txt", text, update, _same)
    assert _comparable(text) == _comparable(expected), changed_message(f"{name} screen")
