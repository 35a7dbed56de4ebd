"""Fixtures shared across test modules."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import tiny_models
from goldens import UPDATE_OPTION

from mllm_deploy.model import LlamaWeights, ModelSpec, load_weights, read_spec


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


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MLLM_DEPLOY_CACHE for this test alone: `tmp_path/cache` (not created; the code under test
    creates what it needs). Returns the directory."""
    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MLLM_DEPLOY_DATA (saved sessions, input history) for this test alone: `tmp_path`."""
    monkeypatch.setenv("MLLM_DEPLOY_DATA", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def smollm_spec() -> ModelSpec:
    """The default model's spec (builtin:smollm2-135m-instruct): metadata only, no weights."""
    return read_spec("builtin:smollm2-135m-instruct")


# Tiny random models (tests/tiny_models.py), written once per test module that asks for one.


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """The default tiny GGUF (tiny_models.TINY) with an untied output head: with a tied head the
    tiny random model mostly repeats its last token."""
    return tiny_models.write_tiny_gguf(tmp_path_factory.mktemp("tiny"), tied=False)


@pytest.fixture(scope="module")
def smallest_gguf(tmp_path_factory) -> Path:
    """tiny_models.SMALLEST as a GGUF with a tied head: what the build, bundle and eval tests compile."""
    return tiny_models.write_tiny_gguf(tmp_path_factory.mktemp("tiny"), tied=True, cfg=tiny_models.SMALLEST)


@pytest.fixture(scope="module")
def tiny_three_layers(tmp_path_factory) -> tuple[Path, ModelSpec, LlamaWeights]:
    """(path, spec, float32 weights) of tiny_models.THREE_LAYERS, untied: the DAG prefill's model."""
    path = tiny_models.write_tiny_gguf(tmp_path_factory.mktemp("tiny"), tied=False, cfg=tiny_models.THREE_LAYERS)
    spec = read_spec(str(path))
    return path, spec, load_weights(spec, use_cache=False)
