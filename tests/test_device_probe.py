"""The host probe: real values in a subprocess, cache reuse and recovery, failure fallback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from mllm_deploy.device import load_capabilities, probe
from mllm_deploy.device.models import HostProbe


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path))
    return tmp_path / probe.CACHE_NAME


def _cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.lower().startswith(("flags", "features")):
            return set(line.partition(":")[2].split())
    return set()


def _count_probes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = probe.run_probe

    def counting(timeout=probe.DEFAULT_TIMEOUT_S):
        calls.append(1)
        return real(timeout)

    monkeypatch.setattr(probe, "run_probe", counting)
    return calls


def test_probe_returns_real_values_for_this_machine(cache):
    result = probe.probe_host()
    assert result.ok and result.warnings == []
    assert result.logical_cpus >= result.usable_cpus >= 1
    assert result.physical_cores >= 1
    if hasattr(os, "sched_getaffinity"):
        assert result.usable_cpus == len(os.sched_getaffinity(0))
    import psutil

    assert 0 < result.ram_bytes <= psutil.virtual_memory().total
    if Path("/proc/cpuinfo").exists():
        flags = _cpuinfo_flags()
        assert result.has_amx_int8 == ("amx_int8" in flags)
        assert result.has_avx512_vnni == ("avx512_vnni" in flags)
        assert result.has_avx_vnni == ("avx_vnni" in flags)
        assert result.has_avx512f == ("avx512f" in flags)
    import onnxruntime

    assert result.onnxruntime_version == onnxruntime.__version__
    assert "CPUExecutionProvider" in result.ort_providers
    assert result.int8_emulated_gops > 0 and "nominal" in result.int8_emulated_gops_source


def test_qnn_mode_matches_platform(cache):
    result = probe.probe_host()
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        assert result.qnn_htp_mode == "absent" and not result.qnn_available
        return
    if result.machine in ("x86_64", "AMD64"):
        assert result.qnn_htp_mode == "simulator" and result.qnn_available
        assert "QNNExecutionProvider" in result.ort_providers
        assert not any(d.startswith("NPU") for d in result.qnn_ep_devices)


def test_host_capabilities_use_probe(cache):
    host = load_capabilities("host")
    p = host.probe
    assert host.ram_bytes == p.ram_bytes and host.cpu_cores == p.usable_cpus
    assert host.npu.int8_tops == pytest.approx(p.int8_emulated_gops / 1000)
    assert "ort-cpu" in host.backends
    assert ("qnn-htp" in host.backends) == p.qnn_available
    # the simulator is never picked by auto; only a real Hexagon NPU is
    assert host.auto_backend == ("qnn-htp" if p.qnn_htp_mode == "device" else "ort-cpu")


def test_cache_is_reused_and_keyed_by_fingerprint(cache, monkeypatch):
    calls = _count_probes(monkeypatch)
    first = probe.probe_host()
    assert len(calls) == 1 and cache.is_file()
    stored = json.loads(cache.read_text())
    assert stored["fingerprint"] == probe.fingerprint()
    assert set(stored["fingerprint"]) >= {"hostname", "python", "onnxruntime", "cpu_model", "kernel"}
    assert probe.probe_host() == first
    assert len(calls) == 1  # served from the cache

    stored["fingerprint"]["onnxruntime"] = "0.0.1"  # e.g. onnxruntime upgraded
    cache.write_text(json.dumps(stored))
    assert probe.probe_host() == first
    assert len(calls) == 2
    assert json.loads(cache.read_text())["fingerprint"] == probe.fingerprint()


@pytest.mark.parametrize("garbage", ["{not json", "", '{"fingerprint": 1}', "[]"])
def test_corrupt_cache_is_reprobed_and_rewritten(cache, monkeypatch, garbage):
    calls = _count_probes(monkeypatch)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(garbage)
    result = probe.probe_host()
    assert result.ok and len(calls) == 1
    HostProbe.model_validate(json.loads(cache.read_text())["probe"])


def test_cache_with_invalid_probe_values_is_reprobed(cache, monkeypatch):
    probe.probe_host()
    stored = json.loads(cache.read_text())
    stored["probe"]["usable_cpus"] = 0
    cache.write_text(json.dumps(stored))
    calls = _count_probes(monkeypatch)
    assert probe.probe_host().usable_cpus >= 1 and len(calls) == 1


CRASH = "import os; os.abort()"
CRASH_AFTER_ORT = (
    "import json, os; from mllm_deploy.device import probe as p; "
    "facts = {'stage': 'ort', **p.collect_cpu(), **p.collect_ort()}; "
    "print(p.MARKER + json.dumps(facts), flush=True); os.abort()"
)


def test_crashing_probe_gives_conservative_host_with_warning(cache, monkeypatch):
    monkeypatch.setattr(probe, "probe_command", lambda: [sys.executable, "-c", CRASH])
    result = probe.probe_host()
    assert not result.ok
    assert "host probe failed" in result.warnings[0] and "conservative" in result.warnings[0]
    assert not result.qnn_available and result.qnn_htp_mode == "absent"
    assert not (result.has_amx_int8 or result.has_avx512_vnni or result.has_avx_vnni)
    assert result.onnxruntime_version is None and result.ort_providers == []
    assert 1 <= result.usable_cpus <= (os.cpu_count() or 1) and result.ram_bytes >= 0
    assert not cache.exists()  # failures are not cached
    host = load_capabilities("host")
    assert "PROBE FAILED" in host.source_note and host.backends == []
    assert host.auto_backend is None


def test_probe_crash_in_qnn_stage_keeps_cpu_and_ort_facts(cache, monkeypatch):
    monkeypatch.setattr(probe, "probe_command", lambda: [sys.executable, "-c", CRASH_AFTER_ORT])
    result = probe.probe_host()
    assert not result.ok and "QNN treated as absent" in result.warnings[0]
    assert result.usable_cpus >= 1 and result.ram_bytes > 0
    assert result.onnxruntime_version and not result.qnn_available
    assert load_capabilities("host").backends == ["ort-cpu"]


def test_timed_out_probe_falls_back(cache, monkeypatch):
    monkeypatch.setattr(probe, "probe_command", lambda: [sys.executable, "-c", "import time; time.sleep(30)"])
    result = probe.probe_host(timeout=0.5)
    assert not result.ok and "timed out" in result.warnings[0]


def test_missing_interpreter_falls_back(cache, monkeypatch):
    monkeypatch.setattr(probe, "probe_command", lambda: ["/nonexistent/python"])
    result = probe.probe_host()
    assert not result.ok and "could not start" in result.warnings[0]


def test_devices_prints_probe_warning_on_stderr(cache, monkeypatch, capsys):
    from mllm_deploy.cli import main

    monkeypatch.setattr(probe, "probe_command", lambda: [sys.executable, "-c", CRASH])
    assert main(["devices"]) == 0
    captured = capsys.readouterr()
    assert "warning: host: host probe failed" in captured.err
    assert "PROBE FAILED" in captured.out
