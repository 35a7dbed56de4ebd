"""Cache of dequantized float32 weights as .npy files, loaded back with mmap.

Layout: `cache_dir()/weights/<key>/` holding one `<tensor name>.npy` per tensor and a
`manifest.json` (written last) listing each array's shape and byte size. An entry is
built in a temporary sibling directory and renamed into place, so readers see a complete
entry or none. An entry whose manifest is missing or unreadable, or whose arrays do not
match it (truncated, deleted, wrong shape), is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from mllm_deploy.model.spec import F32Array
from mllm_deploy.paths import cache_dir, make_build_dir

MANIFEST = "manifest.json"


def weights_cache_root() -> Path:
    root = cache_dir() / "weights"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_key(*parts: object) -> str:
    """A short stable hash of everything that determines the cached arrays."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:24]


def _file_name(tensor: str) -> str:
    return tensor.replace("/", "_") + ".npy"


def load_entry(key: str) -> dict[str, F32Array] | None:
    """The cached arrays (read-only memmaps) of `key`, or None if absent or damaged."""
    entry = weights_cache_root() / key
    if not entry.is_dir():
        return None
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        arrays: dict[str, F32Array] = {}
        for name, meta in manifest["arrays"].items():
            path = entry / _file_name(name)
            if path.stat().st_size != meta["file_bytes"]:
                raise ValueError(f"{path.name}: size differs from the manifest")
            arr = np.load(path, mmap_mode="r")
            if list(arr.shape) != meta["shape"] or arr.dtype != np.float32:
                raise ValueError(f"{path.name}: shape/dtype differs from the manifest")
            arrays[name] = arr
        return arrays
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        shutil.rmtree(entry, ignore_errors=True)  # damaged: the caller rebuilds it
        return None


def drop_entry(key: str) -> None:
    shutil.rmtree(weights_cache_root() / key, ignore_errors=True)


def store_entry(key: str, names: Iterable[str], produce: Callable[[str], F32Array], info: Mapping[str, object]) -> None:
    """Write `produce(name)` for every name into a new entry, atomically. `info` goes in the manifest."""
    root = weights_cache_root()
    tmp = make_build_dir(root, key)
    try:
        arrays = {}
        for name in names:
            arr = np.ascontiguousarray(produce(name), dtype=np.float32)
            path = tmp / _file_name(name)
            np.save(path, arr, allow_pickle=False)
            arrays[name] = {"shape": list(arr.shape), "file_bytes": path.stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps({**info, "arrays": arrays}, indent=1))
        final = root / key
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same entry first, or a damaged one is in the way
            if load_entry(key) is None:
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
