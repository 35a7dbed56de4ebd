"""Golden files (tests/golden/, tests/__snapshots__/): compared under test, written only on request.

A test that compares output with a golden takes the `update_goldens` fixture (tests/conftest.py)
and reads the golden through `golden_text` / `golden_bytes`. A missing golden fails the test; it
never writes itself. `pytest --update-goldens` writes each golden from the run's output instead,
to be reviewed with `git diff` and committed.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

UPDATE_OPTION = "--update-goldens"
REPO = Path(__file__).parent.parent


def rerun_command() -> str:
    """The command that rewrites the current test's goldens (pytest names the running test in
    PYTEST_CURRENT_TEST, e.g. `tests/test_plan.py::test_golden_plan_text_and_json[default] (call)`)."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    return f".venv/bin/python -m pytest {shlex.quote(current or 'tests')} {UPDATE_OPTION}"


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def missing_message(path: Path) -> str:
    return f"golden {_shown(path)} is missing; write it with `{rerun_command()}`, review it and commit it"


def changed_message(what: str) -> str:
    return f"{what} changed; if that is intended, rerun with `{rerun_command()}` and review the diff"


def golden_bytes(path: Path, actual: bytes, update: bool) -> bytes:
    """The committed golden at `path`; with `update`, `actual` is written there first (only when
    it differs, so an unchanged golden keeps its bytes). Fails the test when the golden is missing."""
    if update and (not path.is_file() or path.read_bytes() != actual):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(actual)
    if not path.is_file():
        pytest.fail(missing_message(path), pytrace=False)
    return path.read_bytes()


def golden_text(path: Path, actual: str, update: bool, same: Callable[[str, str], bool] = str.__eq__) -> str:
    """`golden_bytes` for UTF-8 text; `same(golden, actual)` decides whether an update rewrites it
    (a comparison that ignores what varies keeps the committed golden when nothing real changed)."""
    if update and path.is_file() and same(path.read_text(encoding="utf-8"), actual):
        update = False
    return golden_bytes(path, actual.encode("utf-8"), update).decode("utf-8")
