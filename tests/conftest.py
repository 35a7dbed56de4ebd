"""Fixtures shared across test modules."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
from goldens import UPDATE_OPTION


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        UPDATE_OPTION,
        action="store_true",
        default=False,
        help="write golden files (tests/golden/, tests/__snapshots__/) from this run's output instead of "
        "failing on a missing or different one; review `git diff` before committing",
    )


@pytest.fixture(scope="session")
def update_goldens(request: pytest.FixtureRequest) -> bool:
    """True under `pytest --update-goldens`: the one way a golden is written (tests/goldens.py)."""
    return bool(request.config.getoption(UPDATE_OPTION))


@pytest.fixture(scope="session")
def shared_npu_cache(tmp_path_factory) -> Path:
    """One artifact cache for every real-model NPU-path test of a run, shared by xdist workers,
    so the default profile is calibrated and compiled once per run (about a minute on 2 cores)."""
    root = tmp_path_factory.getbasetemp().parent / "npu-real-cache"
    root.mkdir(exist_ok=True)
    return root


@contextmanager
def cache_env(root: Path):
    """MLLM_DEPLOY_CACHE=root for the block, holding an exclusive lock so two workers never
    build the same artifacts at once (the second finds the first one's entry)."""
    old = os.environ.get("MLLM_DEPLOY_CACHE")
    os.environ["MLLM_DEPLOY_CACHE"] = str(root)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if old is None:
                os.environ.pop("MLLM_DEPLOY_CACHE", None)
            else:
                os.environ["MLLM_DEPLOY_CACHE"] = old


@pytest.fixture(scope="module")
def module_private_cache(tmp_path_factory):
    """A cache dir of the test module's own (e.g. keeps the sha256 verification cache out of the
    user's cache dir); use with `pytestmark = pytest.mark.usefixtures("module_private_cache")`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLLM_DEPLOY_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
