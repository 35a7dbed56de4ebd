"""Where mllm-deploy keeps its cache and data, and atomic file writes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import platformdirs

APP = "mllm-deploy"


def cache_dir() -> Path:
    """User cache dir; `MLLM_DEPLOY_CACHE` overrides it (tests use a temp dir)."""
    env = os.environ.get("MLLM_DEPLOY_CACHE")
    path = Path(env) if env else Path(platformdirs.user_cache_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """User data dir (saved sessions); `MLLM_DEPLOY_DATA` overrides it."""
    env = os.environ.get("MLLM_DEPLOY_DATA")
    path = Path(env) if env else Path(platformdirs.user_data_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def resource_dir(name: str) -> Path:
    """A repo-level resource folder (`profiles`, `templates`), shipped inside the wheel as `_name`."""
    here = Path(__file__).resolve().parent
    packaged = here / f"_{name}"
    if packaged.is_dir():
        return packaged
    return here.parent / name


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
