"""Turn the catalog's `host` defaults plus a probe into the host's Capabilities."""

from __future__ import annotations

from typing import Any

from mllm_deploy.backends.registry import NpuBackendName
from mllm_deploy.device.models import Capabilities, CpuCluster, HostProbe, NpuCaps

GIB = 1024**3


def cpu_gflops_per_core(facts: dict[str, Any] | HostProbe) -> tuple[float, str]:
    """Nominal float32 peak GFLOP/s of one core from its clock and widest FMA unit.

    FLOP/cycle: AVX-512 with two FMA ports 64, AVX2+FMA 32, 128-bit NEON x2 16, else 8.
    An unknown clock is taken as 1 GHz (and the label says so).
    """
    get = facts.get if isinstance(facts, dict) else lambda k, d=None: getattr(facts, k, d)
    machine = str(get("machine", "")).lower()
    if get("has_avx512f", False):
        per_cycle, isa = 64, "AVX-512"
    elif get("has_avx2_fma", False):
        per_cycle, isa = 32, "AVX2+FMA"
    elif machine in ("aarch64", "arm64"):
        per_cycle, isa = 16, "NEON"
    else:
        per_cycle, isa = 8, "scalar/SSE"
    ghz = get("cpu_ghz", None)
    if not ghz:
        return float(per_cycle), f"{isa}, clock unknown (1 GHz assumed)"
    return round(ghz * per_cycle, 2), isa


def _int8_units(probe: HostProbe) -> str:
    units = [
        name
        for name, present in (
            ("AMX", probe.has_amx_int8),
            ("AVX512-VNNI", probe.has_avx512_vnni),
            ("AVX-VNNI", probe.has_avx_vnni),
        )
        if present
    ]
    return "/".join(units) if units else "no VNNI/AMX"


def build_host(defaults: Capabilities, probe: HostProbe) -> Capabilities:
    """The `host` Capabilities: catalog defaults with every probed value filled in."""
    gflops, isa = cpu_gflops_per_core(probe)
    cluster = CpuCluster(
        name=f"{probe.cpu_model} ({isa}, {_int8_units(probe)})",
        cores=probe.usable_cpus,
        ghz=probe.cpu_ghz or 1.0,
        gflops_per_core=gflops,
    )
    has_ort = probe.onnxruntime_version is not None
    backends: list[NpuBackendName] = []
    if has_ort:
        backends.append("ort-cpu")
    if probe.qnn_available:
        backends.append("qnn-htp")
    auto: NpuBackendName | None
    if probe.qnn_htp_mode == "device":
        auto = "qnn-htp"
        # A Snapdragon host: QNN does not tell us the SoC here, so no soc_model/htp_arch and
        # conservative support flags; use a catalog target to compile for a known SoC.
        npu = NpuCaps(
            kind="hexagon-htp",
            vendor="Qualcomm",
            supports_fp16=False,
            supports_int16_activations=True,
            supports_per_channel_weights=True,
            addressable_memory_bytes=min(4 * GIB, probe.ram_bytes),
            allowed_chunk_sizes={"multiple_of": 32, "min_tokens": 32, "max_tokens": 1024},
        )
    else:
        auto = "ort-cpu" if has_ort else None
        base = defaults.npu.model_dump() if defaults.npu else {}
        npu = NpuCaps.model_validate(
            {
                **base,
                "int8_tops": probe.int8_emulated_gops / 1000.0,
                "addressable_memory_bytes": probe.ram_bytes,
            }
        )
    note = defaults.source_note
    if not probe.ok:
        note += " PROBE FAILED: conservative fallback values (" + "; ".join(probe.warnings) + ")."
    data = defaults.model_dump()
    data.update(
        source_note=note,
        ram_bytes=probe.ram_bytes,
        cpu_clusters=[cluster.model_dump()],
        memory_bandwidth_gbps=None,
        backends=backends,
        auto_backend=auto,
        npu=npu.model_dump(),
        probe=probe.model_dump(),
    )
    return Capabilities.model_validate(data)
