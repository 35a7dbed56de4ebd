"""Turn the catalog's `host` defaults plus a probe into the host's Capabilities."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from mllm_deploy.backends.registry import NpuBackendName
from mllm_deploy.device.models import Capabilities, CpuCluster, HostProbe, NpuCaps

GIB = 1024**3

OptIn = Literal["emulate", "simulator"]
"""How a Hexagon (`qnn-htp`) profile or bundle may run on a machine without a Hexagon NPU, only
when the user asks: `emulate` runs its QDQ graphs on onnxruntime's CPU integer kernels (labelled
emulation), `simulator` its context binaries on Qualcomm's x86 HTP simulator (labelled; hundreds
of times slower, for verification). The CLI flags `--emulate` / `--simulator`."""

OPT_INS: tuple[OptIn, ...] = get_args(OptIn)


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


SOC_PART = re.compile(r"\b([A-Z]{2,4}\d{4}[A-Z]{0,3})\b")
"""A Qualcomm part number (SM8650, SC8380XP, QCS6490) in a catalog name or a kernel fact."""


@dataclass(frozen=True)
class HexagonHere:
    """The Hexagon NPU of this machine, as far as the probe identifies it."""

    part: str | None  # the SoC part the kernel names (`SM8650`), or None: not named
    catalog_id: str | None  # the catalog target of that part (`sd8gen3`), or None: not catalogued
    htp_arch: int | None  # its HTP architecture (75), from that catalog entry; None: unknown
    soc_model: int | None  # QNN's soc_model id (57), from that catalog entry; None: unknown
    source: str  # where the identification comes from, in words

    @property
    def label(self) -> str:
        """E.g. "Hexagon NPU HTP v75 (SM8650)", or "Hexagon NPU (SoC not identified)"."""
        arch = f" HTP v{self.htp_arch}" if self.htp_arch is not None else ""
        return f"Hexagon NPU{arch} ({self.part or 'SoC not identified'})"


def hexagon_here(probe: HostProbe, catalog: Mapping[str, Capabilities]) -> HexagonHere | None:
    """This machine's Hexagon NPU (None: QNN reports no NPU-type device). QNN's EP reports the
    NPU's presence but no HTP arch or SoC key, so the SoC part is read from the kernel
    (`/sys/devices/soc0/machine`, else `/proc/device-tree/model`) and looked up in the catalog,
    whose entries carry the part in their name ("Snapdragon 8 Gen 3 (SM8650)")."""
    if probe.qnn_htp_mode != "device":
        return None
    parts = {m for entry in catalog.values() for m in SOC_PART.findall(entry.name)}
    for source, text in (
        ("/sys/devices/soc0/machine", probe.soc_machine),
        ("/proc/device-tree/model", probe.board_model),
    ):
        found = [m for m in SOC_PART.findall(text or "") if m in parts] or SOC_PART.findall(text or "")
        if not found:
            continue
        part = found[0]
        entry = next((e for e in catalog.values() if part in SOC_PART.findall(e.name) and e.npu is not None), None)
        if entry is None or entry.npu is None:
            return HexagonHere(part, None, None, None, f"{source} names {part}, which the catalog does not list")
        return HexagonHere(part, entry.id, entry.npu.htp_arch_number, entry.npu.qnn_soc_model,
                           f"{source} names {part}; HTP arch and soc_model from the catalog entry {entry.id}")  # fmt: skip
    return HexagonHere(None, None, None, None, "QNN reports an NPU; the kernel names no SoC part")


def cpu_label(probe: HostProbe) -> str:
    """This machine's CPU in a few words: "x86_64 AMD EPYC, 2 usable CPUs, AVX-512 VNNI"."""
    if probe.has_amx_int8:
        isa = "AMX INT8"
    elif probe.has_avx512_vnni:
        isa = "AVX-512 VNNI"
    elif probe.has_avx_vnni:
        isa = "AVX-VNNI"
    elif probe.machine.lower() in ("aarch64", "arm64"):
        isa = "NEON"
    else:
        isa = "no VNNI/AMX"
    return f"{probe.machine} {probe.cpu_model}, {probe.usable_cpus} usable CPU(s), {isa}"


def npu_here_label(probe: HostProbe, hexagon: HexagonHere | None) -> str:
    """What plays a Hexagon NPU here: the NPU itself, Qualcomm's simulator, or nothing."""
    if hexagon is not None:
        return hexagon.label
    if probe.qnn_htp_mode == "simulator":
        return f"QNN HTP simulator ({probe.machine.replace('_', '-')})"
    return "no Hexagon NPU and no QNN HTP simulator"


def machine_label(probe: HostProbe, hexagon: HexagonHere | None) -> str:
    """The whole machine for "on this machine" lines: CPU, then what plays the NPU."""
    return f"{cpu_label(probe)}; {npu_here_label(probe, hexagon)}"


@dataclass(frozen=True)
class MachineHere:
    """This machine as labels and run decisions need it: the probe and its Hexagon NPU, if any."""

    probe: HostProbe
    hexagon: HexagonHere | None

    @property
    def has_simulator(self) -> bool:
        """Qualcomm's x86 HTP simulator is here (onnxruntime-qnn on x86-64)."""
        return self.probe.qnn_htp_mode == "simulator"

    @property
    def usable_cpus(self) -> int:
        return self.probe.usable_cpus

    @property
    def npu_label(self) -> str:
        return npu_here_label(self.probe, self.hexagon)

    @property
    def label(self) -> str:
        return machine_label(self.probe, self.hexagon)
