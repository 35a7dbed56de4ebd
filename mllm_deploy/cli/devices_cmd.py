"""`mllm-deploy devices [--json]`: the device catalog and this machine's probe."""

from __future__ import annotations

import argparse
import json

from mllm_deploy.cli.common import print_diagnostics
from mllm_deploy.device import HOST_ID, device_ids, hexagon_here, load_capabilities
from mllm_deploy.device.catalog import catalog_entries
from mllm_deploy.errors import Diagnostic

NOMINAL = "*"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "devices",
        help="list target devices and what this machine (host) can do",
        description="List the device catalog (public nominal specs) and the probed host. "
        "Use an id as the profile's device.target.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of capabilities")
    parser.add_argument("--reprobe", action="store_true", help="probe this machine again instead of using the cache")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    devices = [load_capabilities(i, use_probe_cache=not args.reprobe) for i in device_ids()]
    host = next((d for d in devices if d.id == HOST_ID), None)
    if host is not None and host.probe is not None:
        print_diagnostics(Diagnostic(message=w, key="host", severity="warning") for w in host.probe.warnings)
    if args.json:
        print(json.dumps([d.model_dump(mode="json") for d in devices], indent=2))
        return 0
    print(render_table(devices))
    if host is not None:
        print()
        print(render_host(host))
    return 0


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _row(caps) -> list[str]:
    mark = NOMINAL if caps.nominal else ""
    npu = caps.npu
    if npu is None:
        npu_cells = ["-", "-", "-", "-"]
    else:
        if npu.kind == "hexagon-htp":
            what = f"HTP {npu.htp_arch or '?'} soc {npu.qnn_soc_model if npu.qnn_soc_model is not None else '?'}"
        else:
            what = "ort-cpu (emulated)"
        tops = f"{npu.int8_tops:g}{NOMINAL}" if npu.int8_tops else "?"  # TOPS are always nominal
        support = "/".join(
            _yn(f) for f in (npu.supports_per_channel_weights, npu.supports_int16_activations, npu.supports_fp16)
        )
        npu_cells = [what, tops, support, _gib(npu.addressable_memory_bytes) + mark]
    cpu = f"{caps.cpu_cores} ({caps.cpu_gflops:.0f} GF{NOMINAL})"
    return [caps.id, caps.name, *npu_cells, _gib(caps.ram_bytes) + mark, cpu, ", ".join(caps.backends) or "-"]


def render_table(devices) -> str:
    head = ["ID", "NAME", "NPU", "INT8 TOPS", "PERCH/INT16/FP16", "NPU MEM", "RAM", "CPU CORES", "BACKENDS"]
    rows = [head] + [_row(d) for d in devices]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    lines.append(
        f"{NOMINAL} nominal: public specs or figures derived from them (catalog), or derived from the "
        "probed CPU's ISA (host); unmarked host values are probed on this machine."
    )
    lines.append("PERCH/INT16/FP16: per-channel INT8 weights / 16-bit activations / float16 graphs supported.")
    return "\n".join(lines)


def render_host(caps) -> str:
    probe = caps.probe
    if probe is None:
        return "host: not probed"
    units = ", ".join(
        f"{name} {_yn(flag)}"
        for name, flag in (
            ("AMX-INT8", probe.has_amx_int8),
            ("AVX512-VNNI", probe.has_avx512_vnni),
            ("AVX-VNNI", probe.has_avx_vnni),
        )
    )
    ghz = f", {probe.cpu_ghz:g} GHz" if probe.cpu_ghz else ""
    lines = [
        f"host: {probe.cpu_model} ({probe.system} {probe.machine})"
        + ("" if probe.ok else "  [PROBE FAILED: conservative values]"),
        f"  CPU: {probe.usable_cpus} usable of {probe.logical_cpus} logical CPUs "
        f"({probe.physical_cores} physical){ghz}; {units}",
        f"  RAM: {_gib(probe.ram_bytes)}",
    ]
    if probe.onnxruntime_version:
        lines.append(f"  onnxruntime {probe.onnxruntime_version}: {', '.join(probe.ort_providers) or 'no providers'}")
        int8 = (
            "INT8 via AMX/VNNI"
            if (probe.has_amx_int8 or probe.has_avx512_vnni or probe.has_avx_vnni)
            else ("INT8 without VNNI/AMX (slow)")
        )
        lines.append(
            f"  ort-cpu: {int8}, ~{probe.int8_emulated_gops:g} GOP/s{NOMINAL} "
            f"({probe.int8_emulated_gops_source}); the emulated NPU"
        )
    else:
        lines.append("  onnxruntime: not importable (no ort-cpu or qnn-htp backend)")
    qnn_versions = ""
    if probe.qnn_version:
        qnn_versions = f" [onnxruntime-qnn {probe.qnn_version}, QNN SDK {probe.qnn_sdk_version or '?'}]"
    if probe.soc_machine or probe.board_model or probe.soc_id is not None:
        lines.append(f"  SoC: {probe.soc_machine or '?'} (kernel soc_id {probe.soc_id if probe.soc_id is not None else '?'}); "
                     f"board: {probe.board_model or '?'}")  # fmt: skip
    if probe.qnn_htp_mode == "device":
        hexagon = hexagon_here(probe, catalog_entries())
        lines.append(f"  QNN HTP: real Hexagon NPU (used by auto){qnn_versions}")
        if hexagon is not None:
            known = (
                f" = {hexagon.catalog_id} (HTP v{hexagon.htp_arch}, soc_model {hexagon.soc_model})"
                if hexagon.catalog_id
                else ""
            )
            lines.append(f"  Hexagon: {hexagon.part or 'SoC not identified'}{known}; {hexagon.source}")
    elif probe.qnn_htp_mode == "simulator":
        lines.append("  QNN HTP: x86 simulator (correct, ~200-700x slower than CPU; not used by auto)" + qnn_versions)
    else:
        lines.append("  QNN HTP: absent" + qnn_versions)
    lines.append(f"  auto backend: {caps.auto_backend or 'none (everything float32 on the CPU)'}")
    return "\n".join(lines)
