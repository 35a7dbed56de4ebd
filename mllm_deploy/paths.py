"""Where mllm-deploy keeps its cache and data, and atomic file writes."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
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


_BUILD_DIR = re.compile(r"^\..+\.pid(\d+)\.[a-z0-9_]{8}$")  # what make_build_dir names (mkdtemp's 8-character tail)


def make_build_dir(parent: Path, name: str) -> Path:
    """A new temporary directory in `parent` to build `name` in before it is renamed into place,
    tagged with this process id. Directories that builds killed outright (kill -9, power loss) left
    behind are removed first: their process no longer runs."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_build_dirs(parent)
    return Path(tempfile.mkdtemp(prefix=f".{name}.pid{os.getpid()}.", dir=parent))


def remove_orphaned_build_dirs(parent: Path) -> list[Path]:
    """Remove the build directories in `parent` whose process is gone; returns what was removed.
    A directory of a live process (another build running now) is left alone."""
    removed = []
    for entry in Path(parent).iterdir():
        match = _BUILD_DIR.match(entry.name)
        if match and entry.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


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
