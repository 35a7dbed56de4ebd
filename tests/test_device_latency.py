"""The scheduler's seed latencies on a device (issue 16): profiled at the first run on the device
and stored next to the bundle (or, read-only, in the cache keyed by the bundle), then reused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mllm_deploy.backends.base import GraphHandle
from mllm_deploy.runtime import device_latency
from mllm_deploy.runtime.device_latency import device_latencies, profile_places


class CountingBackend:
    """Runs nothing; counts runs (a test double for the NPU backend protocol)."""

    name = "counting"

    def __init__(self) -> None:
        self.runs = 0

    def run(self, handle: GraphHandle, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs += 1
        assert all(v.shape == handle.inputs[k] for k, v in inputs.items())
        return {}


HANDLES = {(layer, kind): GraphHandle(f"{layer}_{kind}", {"x": (4, 8)}, {}, None) for layer in (0, 1)
           for kind in ("qkv", "down")}  # fmt: skip


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "bundle"
    (root / "artifacts").mkdir(parents=True)
    (root / "bundle.json").write_text('{"format_version": 3}')
    return root


def test_the_first_run_profiles_every_graph_and_stores_it_next_to_the_bundle(bundle):
    backend = CountingBackend()
    seed, source = device_latencies(backend, HANDLES, bundle / "artifacts", 57)
    stored = bundle / "latencies.soc57.json"
    assert backend.runs == 4 * len(HANDLES)  # a warm-up and three timed runs per graph
    assert set(seed) == {"0/qkv", "0/down", "1/qkv", "1/down"} and all(v >= 0 for v in seed.values())
    assert json.loads(stored.read_text()) == seed and str(stored) in source and "now" in source
    again, source = device_latencies(backend, HANDLES, bundle / "artifacts", 57)
    assert again == seed and backend.runs == 16 and "at its first run" in source  # read, not measured
    device_latencies(backend, HANDLES, bundle / "artifacts", 69)
    assert backend.runs == 32 and (bundle / "latencies.soc69.json").is_file()  # per SoC


def test_a_read_only_bundle_keeps_its_profile_in_the_cache_keyed_by_the_bundle(bundle, tmp_path, monkeypatch):
    real_write = device_latency.atomic_write_text

    def read_only_bundle(path, text):  # what a read-only mount says (chmod does not stop root)
        if bundle in path.parents:
            raise PermissionError(13, "Read-only file system", str(path))
        real_write(path, text)

    monkeypatch.setattr(device_latency, "atomic_write_text", read_only_bundle)
    _, source = device_latencies(CountingBackend(), HANDLES, bundle / "artifacts", 57)
    in_cache = profile_places(bundle / "artifacts", 57)[1]
    assert in_cache.is_file() and in_cache.parent == tmp_path / "cache" / "device-latencies"
    assert str(in_cache) in source and not (bundle / "latencies.soc57.json").exists()
    backend = CountingBackend()
    device_latencies(backend, HANDLES, bundle / "artifacts", 57)
    assert backend.runs == 0  # the next run reads it from the cache


def test_a_profile_missing_a_graph_is_measured_again(bundle):
    (bundle / "latencies.soc57.json").write_text(json.dumps({"0/qkv": 1.0}))
    backend = CountingBackend()
    seed, _ = device_latencies(backend, HANDLES, bundle / "artifacts", 57)
    assert backend.runs == 16 and set(seed) == {"0/qkv", "0/down", "1/qkv", "1/down"}


def test_the_cache_place_is_keyed_by_the_bundle_lockfile(bundle):
    first = profile_places(bundle / "artifacts", 57)
    (bundle / "bundle.json").write_text('{"format_version": 3, "other": 1}')
    second = profile_places(bundle / "artifacts", 57)
    assert first[0] == second[0] == bundle / "latencies.soc57.json" and first[1] != second[1]
