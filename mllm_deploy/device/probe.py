"""Probe this machine: cores, RAM, CPU integer units, onnxruntime and QNN HTP.

The probe runs in a subprocess (`python -m mllm_deploy.device.probe`) so that a crashing
driver (QNN loads vendor libraries) cannot take the tool down. The child prints its
findings as JSON lines prefixed with `MARKER` after each stage (`cpu`: cores, RAM, flags;
`ort`: onnxruntime; `full`: QNN EP registered and HTP mode), so a crash in a later stage
still leaves the facts of the earlier ones. The parent caches a complete result in
`cache_dir()/host-probe.json`, keyed by a fingerprint of this machine and its libraries.
A failed, crashed or timed-out probe yields conservative values with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from mllm_deploy import __version__
from mllm_deploy.device.host import cpu_gflops_per_core
from mllm_deploy.device.models import HostProbe
from mllm_deploy.paths import atomic_write_text, cache_dir

PROBE_SCHEMA = 2  # bump when the probe's output changes meaning; invalidates caches
MARKER = "MLLM_DEPLOY_PROBE_JSON:"
CACHE_NAME = "host-probe.json"
DEFAULT_TIMEOUT_S = 60.0

# Nominal INT8 GOP/s per core of onnxruntime's CPU integer kernels (QLinearMatMul /
# MatMulIntegerToFloat), by the best INT8 unit the CPU has. Source: DESIGN.md §3, measured
# in this project on Sapphire Rapids: 1-2.4 TOP/s on 2 cores with AMX (we take the low end),
# "elsewhere VNNI gives roughly half". Without VNNI we assume no better than float32 peak.
AMX_INT8_GOPS_PER_CORE = 500.0
VNNI_INT8_GOPS_PER_CORE = 250.0


# --- run in the child -------------------------------------------------------------------


def _cpuinfo() -> tuple[str, set[str]]:
    """CPU model name and feature flags from /proc/cpuinfo (Linux); else platform info."""
    model = ""
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not model and key in ("model name", "hardware", "cpu model"):
            model = value.strip()
        elif not flags and key in ("flags", "features"):
            flags = set(value.split())
    return model or platform.processor() or platform.machine() or "unknown CPU", flags


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _cgroup_memory_limit() -> int | None:
    """The cgroup memory limit of this process in bytes, if one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            return int(raw)
    return None


def _cpu_ghz(text_mhz: str | None) -> float | None:
    try:
        freq = psutil.cpu_freq()
    except Exception:
        freq = None
    if freq is not None:
        mhz: float = freq.max or freq.current  # psutil ships no type stubs: its fields are Any
        if mhz:
            return round(mhz / 1000.0, 3)
    if text_mhz:
        try:
            return round(float(text_mhz) / 1000.0, 3)
        except ValueError:
            return None
    return None


def _cpu_mhz_from_cpuinfo() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("cpu mhz"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def _read_fact(path: str) -> str | None:
    """A one-line kernel fact (sysfs, device tree), stripped of the device tree's NUL; None if absent."""
    try:
        text = Path(path).read_bytes().decode(errors="replace").strip("\x00 \n\t")
    except OSError:
        return None
    return text or None


def collect_soc() -> dict[str, Any]:
    """The SoC as the Linux kernel names it: `/sys/devices/soc0/machine` (part, e.g. SM8650),
    `/sys/devices/soc0/soc_id` (Qualcomm's msm-id) and `/proc/device-tree/model` (the board).
    All None on x86 and wherever the files do not exist."""
    soc_id = _read_fact("/sys/devices/soc0/soc_id")
    return {
        "soc_machine": _read_fact("/sys/devices/soc0/machine"),
        "soc_id": int(soc_id) if soc_id is not None and soc_id.isdigit() else None,
        "board_model": _read_fact("/proc/device-tree/model"),
    }


def collect_cpu() -> dict[str, Any]:
    """CPU, cores and RAM facts (no onnxruntime)."""
    model, flags = _cpuinfo()
    ram = psutil.virtual_memory().total
    limit = _cgroup_memory_limit()
    if limit is not None:
        ram = min(ram, limit)
    return {
        "system": platform.system() or "unknown",
        "machine": platform.machine() or "unknown",
        "cpu_model": model,
        "physical_cores": psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        "logical_cpus": psutil.cpu_count() or 1,
        "usable_cpus": _usable_cpus(),
        "cpu_ghz": _cpu_ghz(_cpu_mhz_from_cpuinfo()),
        "ram_bytes": int(ram),
        "has_amx_int8": "amx_int8" in flags,
        "has_avx512_vnni": "avx512_vnni" in flags,
        "has_avx_vnni": "avx_vnni" in flags,
        "has_avx512f": "avx512f" in flags,
        "has_avx2_fma": "avx2" in flags and "fma" in flags,
        **collect_soc(),
    }


def collect_ort() -> dict[str, Any]:
    """onnxruntime version and built-in providers."""
    try:
        # deferred on purpose: onnxruntime loads only in the probe subprocess, after the CPU stage is
        # printed, so an onnxruntime that fails or crashes while loading still leaves the CPU facts
        import onnxruntime as ort  # noqa: PLC0415
    except Exception as exc:
        return {"warnings": [f"onnxruntime cannot be imported: {exc}"]}
    ort.set_default_logger_severity(3)
    return {"onnxruntime_version": ort.__version__, "ort_providers": list(ort.get_available_providers())}


def collect_qnn(machine: str, providers: list[str]) -> dict[str, Any]:
    """Register the QNN plugin EP and tell a real Hexagon NPU from the x86 HTP simulator."""
    out: dict[str, Any] = {"qnn_available": False, "qnn_htp_mode": "absent", "warnings": []}
    try:
        # deferred on purpose: the QNN plugin (optional) loads only in the probe subprocess's last stage,
        # so a plugin that fails or crashes while loading still leaves the CPU and onnxruntime facts
        import onnxruntime as ort  # noqa: PLC0415
        import onnxruntime_qnn  # noqa: PLC0415
    except Exception:
        return out
    out["qnn_version"] = getattr(onnxruntime_qnn, "__version__", None)
    info = getattr(onnxruntime_qnn, "build_and_package_info", None)
    out["qnn_sdk_version"] = getattr(info, "qnn_version", None)
    ep_name = onnxruntime_qnn.get_ep_name()
    try:
        ort.register_execution_provider_library(ep_name, onnxruntime_qnn.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == ep_name]
    except Exception as exc:
        out["warnings"].append(f"QNN execution provider failed to register: {exc}")
        return out
    if devices and ep_name not in providers:
        out["ort_providers"] = [*providers, ep_name]
    out["qnn_ep_devices"] = [f"{d.device.type.name} {d.device.vendor}".strip() for d in devices]
    htp_lib = Path(onnxruntime_qnn.get_qnn_htp_path())
    npus = [d for d in devices if d.device.type == ort.OrtHardwareDeviceType.NPU]
    has_npu = bool(npus)
    if npus:  # what onnxruntime says about the NPU, verbatim (no documented arch/SoC key yet)
        hw = npus[0].device
        out["npu_metadata"] = {
            "vendor": str(hw.vendor),
            "vendor_id": str(hw.vendor_id),
            "device_id": str(hw.device_id),
            **{f"hw.{k}": str(v) for k, v in dict(hw.metadata).items()},
            **{f"ep.{k}": str(v) for k, v in dict(npus[0].ep_metadata).items() if k != "library_path"},
        }
    if devices and htp_lib.is_file():
        if has_npu:
            out["qnn_available"], out["qnn_htp_mode"] = True, "device"
        elif machine.lower() in ("x86_64", "amd64"):
            # On x86-64 the HTP backend library is Qualcomm's HTP simulator.
            out["qnn_available"], out["qnn_htp_mode"] = True, "simulator"
    return out


def main() -> int:
    facts: dict[str, Any] = {"stage": "cpu", **collect_cpu()}
    print(MARKER + json.dumps(facts), flush=True)
    facts.update(collect_ort(), stage="ort")
    print(MARKER + json.dumps(facts), flush=True)
    qnn = collect_qnn(facts["machine"], facts.get("ort_providers", []))
    warnings = facts.get("warnings", []) + qnn.pop("warnings")
    facts.update(qnn, stage="full", warnings=warnings)
    print(MARKER + json.dumps(facts), flush=True)
    return 0


# --- run in the parent ------------------------------------------------------------------


def probe_command() -> list[str]:
    """The command that runs the probe (tests replace it with a crashing one)."""
    return [sys.executable, "-m", "mllm_deploy.device.probe"]


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def fingerprint() -> dict[str, str]:
    """What a cached probe is valid for; any change means a new probe."""
    model, _ = _cpuinfo()
    return {
        "probe_schema": str(PROBE_SCHEMA),
        "mllm_deploy": __version__,
        "hostname": socket.gethostname(),
        "python": f"{sys.executable} {platform.python_version()}",
        "onnxruntime": _dist_version("onnxruntime"),
        "onnxruntime_qnn": _dist_version("onnxruntime-qnn"),
        "cpu_model": model,
        "usable_cpus": str(_usable_cpus()),
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
    }


def int8_emulated(cpu: dict[str, Any], gflops_per_core: float) -> tuple[float, str]:
    """Nominal ort-cpu INT8 GOP/s for the usable CPUs, and where the figure comes from."""
    cores = cpu["usable_cpus"]
    if cpu["has_amx_int8"]:
        per, why = AMX_INT8_GOPS_PER_CORE, "AMX; DESIGN.md §3 measured 1-2.4 TOP/s on 2 cores, low end"
    elif cpu["has_avx512_vnni"] or cpu["has_avx_vnni"]:
        per, why = VNNI_INT8_GOPS_PER_CORE, "VNNI; about half of AMX per DESIGN.md §3"
    else:
        per, why = gflops_per_core, "no VNNI/AMX; assumed no faster than float32 peak"
    return per * cores, f"nominal {per:g} GOP/s per core x {cores} usable CPUs: {why}"


def _fallback(warnings: list[str], partial: dict[str, Any] | None) -> dict[str, Any]:
    """Conservative values when the probe did not finish: the facts of the stages that did,
    else CPU count and RAM read in-process (psutil and os only, no vendor libraries), with
    every INT8 unit and accelerator off."""
    try:
        ram = int(psutil.virtual_memory().total)
    except Exception:
        ram = 0
    facts: dict[str, Any] = {
        "system": platform.system() or "unknown",
        "machine": platform.machine() or "unknown",
        "cpu_model": "unknown CPU (probe failed)",
        "physical_cores": 1,
        "logical_cpus": _usable_cpus(),
        "usable_cpus": _usable_cpus(),
        "cpu_ghz": None,
        "ram_bytes": ram,
        "has_amx_int8": False,
        "has_avx512_vnni": False,
        "has_avx_vnni": False,
        "has_avx512f": False,
        "has_avx2_fma": False,
    }
    if partial:
        keep = set(facts) | {"onnxruntime_version", "ort_providers", "soc_machine", "soc_id", "board_model"}
        facts.update({k: v for k, v in partial.items() if k in keep})
        warnings = partial.get("warnings", []) + warnings
    facts.update({"qnn_available": False, "qnn_htp_mode": "absent", "warnings": warnings})
    return facts


def run_probe(timeout: float = DEFAULT_TIMEOUT_S) -> tuple[dict[str, Any], bool]:
    """Run the probe subprocess; return (facts, complete). Never raises for probe failures."""
    try:
        proc = subprocess.run(
            probe_command(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        partial = _last_result(stdout or "")
        return _fallback([f"host probe timed out after {timeout:g} s; using conservative values"], partial), False
    except OSError as exc:
        return _fallback([f"host probe could not start: {exc}; using conservative values"], None), False
    result = _last_result(proc.stdout)
    if proc.returncode == 0 and result and result.get("stage") == "full":
        return result, True
    detail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
    what = f"host probe failed (exit {proc.returncode}: {detail[0][:200]})"
    if result and result.get("stage") == "ort":  # died in the QNN stage
        return _fallback([f"{what}; QNN treated as absent"], result), False
    if result:  # only the CPU stage finished
        return _fallback([f"{what}; onnxruntime and QNN treated as absent"], result), False
    return _fallback([f"{what}; using conservative values"], None), False


def _last_result(stdout: str) -> dict[str, Any] | None:
    found = None
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            try:
                found = json.loads(line[len(MARKER) :])
            except json.JSONDecodeError:
                continue
    return found if isinstance(found, dict) else None


def _read_cache(path: Path, fp: dict[str, str]) -> HostProbe | None:
    """The cached probe if it exists, parses, validates and matches `fp`; else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("fingerprint") != fp:
            return None
        return HostProbe.model_validate(data["probe"])
    except Exception:
        return None


def probe_host(*, use_cache: bool = True, timeout: float = DEFAULT_TIMEOUT_S) -> HostProbe:
    """This machine's probe: from the cache when it matches, else a fresh subprocess probe."""
    fp = fingerprint()
    path = cache_dir() / CACHE_NAME
    if use_cache:
        cached = _read_cache(path, fp)
        if cached is not None:
            return cached
    facts, complete = run_probe(timeout)
    facts.pop("stage", None)
    gops, source = int8_emulated(facts, cpu_gflops_per_core(facts)[0])
    probe = HostProbe.model_validate(
        {
            **facts,
            "ok": complete,
            "int8_emulated_gops": gops,
            "int8_emulated_gops_source": source,
            "fingerprint": fp,
        }
    )
    if complete:
        payload = {"fingerprint": fp, "probe": probe.model_dump(mode="json")}
        with contextlib.suppress(OSError):  # an unwritable cache only costs a re-probe next time
            atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))
    return probe


if __name__ == "__main__":
    sys.exit(main())
