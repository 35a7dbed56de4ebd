"""A bundle's files against its lockfile: every size on every open, each sha256 once per file state.

Hashing the default model's bundle takes ~0.45 s warm and ~1.5 s cold here, so a file's verified
hash is remembered in `cache_dir()/verified-bundles.json` keyed by its path, size, mtime, ctime and
inode (any write to the file changes its ctime) and later opens only `stat` it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from mllm_deploy.compile.bundle_lock import BundleLock
from mllm_deploy.compile.bundle_refusal import REBUILD, refuse_bundle
from mllm_deploy.paths import atomic_write_text, cache_dir, sha256_file

STAMPS = "verified-bundles.json"


def _stamp_path() -> Path:
    return cache_dir() / STAMPS


def _load_stamps() -> dict[str, dict[str, object]]:
    try:
        known = json.loads(_stamp_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def verify_bundle_files(root: Path, lock: BundleLock, *, rehash: bool) -> dict[str, dict[str, object]]:
    """Every listed file exists with its size and sha256; returns the stamps of files hashed now."""
    known = {} if rehash else _load_stamps()
    fresh: dict[str, dict[str, object]] = {}
    for rel, entry in lock.files.items():
        path = root / rel
        try:
            st = path.stat()
        except OSError:
            raise refuse_bundle(root, f"{rel} is missing (its lockfile lists {entry.size} bytes)", file=path,
                          hint=f"copy the whole bundle again, or {REBUILD}") from None  # fmt: skip
        if st.st_size != entry.size or not path.is_file():
            raise refuse_bundle(root, f"{rel} has {st.st_size} bytes; its lockfile says {entry.size}", file=path,
                          hint=f"the copy is damaged or was changed: copy the bundle again, or {REBUILD}")  # fmt: skip
        stamp: dict[str, object] = {
            "stamp": [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino],
            "sha256": entry.sha256,
        }
        if known.get(str(path)) == stamp:
            continue
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise refuse_bundle(root, f"{rel} has sha256 {digest[:16]}...; its lockfile says {entry.sha256[:16]}...",
                          file=path, hint=f"the copy is damaged or was changed: copy the bundle again, or {REBUILD}")  # fmt: skip
        fresh[str(path)] = stamp
    return fresh


def remember_verified(fresh: dict[str, dict[str, object]]) -> None:
    """Record the files verified now (and forget files that no longer exist); best effort."""
    if not fresh:
        return
    known = _load_stamps()
    known = {p: s for p, s in known.items() if Path(p).exists()}
    known.update(fresh)
    with contextlib.suppress(OSError):  # a read-only cache: the next open hashes again
        atomic_write_text(_stamp_path(), json.dumps(known))
