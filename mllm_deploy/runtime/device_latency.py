"""The scheduler's seed latencies measured on the device itself, stored after the first run.

A `qnn-htp` bundle built on an x86 host ships the device cost model as its latencies
(`compile.bundle_latency`), never the simulator's timings. The first time its graphs load on a
real Hexagon NPU, every graph is timed there (`PROFILE_RUNS` runs after a warm-up, median) and
the figures are written atomically to

    BUNDLE/latencies.soc<soc_model>.json     next to the bundle (not one of its hashed files), or
    cache_dir()/device-latencies/<bundle key>.soc<soc_model>.json   when the bundle is read-only

(the bundle key: sha256 of its lockfile), and every later run on that SoC is seeded with them.
On the simulator, or on a CPU backend, nothing is measured or written here.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from mllm_deploy.backends.base import GraphHandle, NpuBackend
from mllm_deploy.device.probe import probe_host
from mllm_deploy.paths import atomic_write_text, cache_dir

PROFILE_RUNS = 3
BUNDLE_LOCKFILE = "bundle.json"  # compile.bundle.BUNDLE_INFO (a bundle's root holds it)


def on_hexagon_device() -> bool:
    """Whether this machine's QNN HTP backend is a real Hexagon NPU (the probe, cached), not the
    x86 simulator: only then are graph timings the device's."""
    return probe_host().qnn_htp_mode == "device"


def profile_name(soc_model: int) -> str:
    return f"latencies.soc{soc_model}.json"


def profile_places(artifacts_root: Path, soc_model: int) -> list[Path]:
    """Where a device profile of the artifacts at `artifacts_root` is kept, in order of preference:
    next to the bundle (when they are a bundle's), then the user cache keyed by the bundle (or entry)."""
    root = Path(artifacts_root)
    bundle = root.parent if (root.parent / BUNDLE_LOCKFILE).is_file() else None
    keyed = (bundle / BUNDLE_LOCKFILE) if bundle is not None else (root / "lock.json")
    key = hashlib.sha256(keyed.read_bytes()).hexdigest()[:24] if keyed.is_file() else root.name
    in_cache = cache_dir() / "device-latencies" / f"{key}.{profile_name(soc_model)}"
    return ([bundle / profile_name(soc_model)] if bundle is not None else []) + [in_cache]


def read_device_latencies(places: list[Path], expected: set[str]) -> tuple[dict[str, float], Path] | None:
    """The first stored profile that covers every graph of `expected` (layer/kind), with its path."""
    for path in places:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and set(data) >= expected and all(isinstance(v, (int, float)) for v in data.values()):
            return {key: float(data[key]) for key in expected}, path
    return None


def profile_graphs(backend: NpuBackend, handles: dict[tuple[int, str], GraphHandle]) -> dict[str, float]:
    """Median wall time (ms) of every loaded graph on `backend`, on random inputs after a warm-up."""
    rng = np.random.default_rng(0)
    measured = {}
    for (layer, kind), handle in handles.items():
        feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in handle.inputs.items()}
        backend.run(handle, feeds)
        times = []
        for _ in range(PROFILE_RUNS):
            started = time.perf_counter()
            backend.run(handle, feeds)
            times.append((time.perf_counter() - started) * 1e3)
        measured[f"{layer}/{kind}"] = float(np.median(times))
    return measured


def store_device_latencies(places: list[Path], latencies: dict[str, float]) -> Path | None:
    """Write the profile to the first place that takes it (atomically); None if none does."""
    for path in places:
        try:
            atomic_write_text(path, json.dumps(latencies, indent=1))
            return path
        except OSError:
            continue
    return None


def device_latencies(
    backend: NpuBackend, handles: dict[tuple[int, str], GraphHandle], artifacts_root: Path, soc_model: int
) -> tuple[dict[str, float], str]:
    """The seed latencies (layer/kind -> ms) on this device and where they come from: the stored
    first-run profile, or measured now and stored."""
    places = profile_places(artifacts_root, soc_model)
    stored = read_device_latencies(places, {f"{layer}/{kind}" for layer, kind in handles})
    if stored is not None:
        return stored[0], f"profiled on this device (SoC {soc_model}) at its first run: {stored[1]}"
    measured = profile_graphs(backend, handles)
    path = store_device_latencies(places, measured)
    where = str(path) if path is not None else "not stored: no writable place"
    return measured, f"profiled on this device (SoC {soc_model}) now: {where}"
