"""The one registry of NPU backends: each declares here, once, what it supports.

The profile's `device.npu_backend` choices, the device catalog's `backends`, the resolver's
checks, the compiler's graph form and the runtime's loader all read this table; no other module
names a backend. Importing this module is cheap: an implementation (onnxruntime, its QNN plugin)
is imported only when a backend is opened.

    support = BACKENDS["ort-cpu"]                  # what it can run (dtypes, roles, artifacts)
    arch = htp_arch_support(68)                     # what one Hexagon HTP generation can run
    backend = open_backend("qnn-htp", htp_arch=75)  # the implementation, ready to load graphs
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal, get_args

from mllm_deploy.backends.base import NpuBackend

NpuBackendName = Literal["qnn-htp", "ort-cpu"]
"""The registered backends (the keys of BACKENDS, in the same order)."""

NpuRole = Literal["linears", "norms", "lm_head", "attention"]
"""Kinds of subgraph a plan could place on the NPU (profile `placement.*`, plus the linears)."""


@dataclass(frozen=True)
class BackendSupport:
    """What one NPU backend really implements (not what a device could do in principle)."""

    name: NpuBackendName
    summary: str  # one line for `devices` and reports
    runs_on: str  # where it can execute, in words
    activations: frozenset[str]  # `quantization.activations` its graphs take
    weights: frozenset[str]  # `quantization.weights` its graphs take
    npu_roles: frozenset[NpuRole]  # subgraph kinds the compiler builds as graphs for it
    context_binaries: bool  # compiles ahead-of-time context binaries for a target SoC
    quantized_outputs: bool  # every linear output must carry its own Q/DQ grid (QNN's unit)
    uses_npu_threads: bool  # `device.npu_threads` applies (the NPU is emulated on CPU cores)
    needs_htp_arch: bool  # the target device must name its Hexagon HTP architecture
    module: str  # implementation module, imported on open
    factory: str  # class in `module`


BACKENDS: dict[NpuBackendName, BackendSupport] = {
    "qnn-htp": BackendSupport(
        name="qnn-htp",
        summary="onnxruntime QNN HTP (Hexagon NPU; Qualcomm's simulator on x86-64)",
        runs_on="Snapdragon devices with a Hexagon NPU; on x86-64 Linux, Qualcomm's HTP simulator",
        activations=frozenset({"uint8", "uint16"}),
        weights=frozenset({"int8-per-tensor", "int8-per-channel"}),
        npu_roles=frozenset({"linears"}),
        context_binaries=True,
        quantized_outputs=True,
        uses_npu_threads=False,
        needs_htp_arch=True,
        module="mllm_deploy.backends.qnn_htp",
        factory="QnnHtpBackend",
    ),
    "ort-cpu": BackendSupport(
        name="ort-cpu",
        summary="onnxruntime CPU integer kernels (an emulated NPU)",
        runs_on="any host onnxruntime runs on (AMX or VNNI integer kernels where the CPU has them)",
        activations=frozenset({"uint8", "uint16"}),
        weights=frozenset({"int8-per-tensor", "int8-per-channel"}),
        npu_roles=frozenset({"linears"}),
        context_binaries=False,
        quantized_outputs=False,
        uses_npu_threads=True,
        needs_htp_arch=False,
        module="mllm_deploy.backends.ort_cpu",
        factory="OrtCpuBackend",
    ),
}

if tuple(BACKENDS) != get_args(NpuBackendName):  # one fact: the type and the table agree
    raise RuntimeError(f"NpuBackendName {get_args(NpuBackendName)} differs from BACKENDS {tuple(BACKENDS)}")


@dataclass(frozen=True)
class HtpArchSupport:
    """What one Hexagon HTP generation runs of our graphs (qnn-htp's `htp_arch`), as measured
    by compiling one real layer's graphs for it (tests/test_qnn_arch.py) and stated in `source`."""

    arch: int  # QNN's `htp_arch` number
    int16_activations: bool  # A16W8 graphs: uint16 activations in and out, int8 weights
    float_elementwise: bool  # float (FP16) Sigmoid/Mul inside a graph: gate_up's fused SiLU·mul
    source: str  # where the two facts come from


_QNN_DOCS = (
    "Qualcomm AI Engine Direct (QNN) docs, HTP backend (docs.qualcomm.com 80-63442-50, htp_backend: "
    "'QNN HTP Precision'; network design: 'HTP supports A8, A16 and FP16 activations')"
)
_SIM = "measured: onnxruntime-qnn 2.7 HTP simulator compiles and runs one real SmolLM2 layer's A16W8 graphs"

HTP_ARCHS: dict[int, HtpArchSupport] = {
    68: HtpArchSupport(68, int16_activations=True, float_elementwise=False, source=(
        f"{_QNN_DOCS}; FP16 is absent on v68 (QNN: \"The SocModel doesn't support FP16\" on a QCS6490, "
        "github.com/immich-app/immich/discussions/25112). "
        f"{_SIM}, and rejects the float SiLU·mul (\"Unsupported nodes in QNN EP: silu_sigmoid, silu_mul, "
        "swiglu_mul\") for uint8 and uint16 alike")),
    69: HtpArchSupport(69, int16_activations=True, float_elementwise=True, source=f"{_QNN_DOCS}. {_SIM}, float SiLU·mul included"),
    73: HtpArchSupport(73, int16_activations=True, float_elementwise=True, source=f"{_QNN_DOCS}. {_SIM}, float SiLU·mul included"),
    75: HtpArchSupport(75, int16_activations=True, float_elementwise=True, source=f"{_QNN_DOCS}. {_SIM}, float SiLU·mul included"),
    79: HtpArchSupport(79, int16_activations=True, float_elementwise=True, source=f"{_QNN_DOCS}. {_SIM}, float SiLU·mul included"),
    81: HtpArchSupport(81, int16_activations=True, float_elementwise=True, source=f"{_QNN_DOCS}. {_SIM}, float SiLU·mul included"),
}  # fmt: skip
"""The Hexagon HTP generations qnn-htp compiles for (device catalog `npu.htp_arch` = "v<arch>")."""


def htp_arch_support(arch: int) -> HtpArchSupport:
    """The registered facts of HTP `arch`; KeyError names the registered generations."""
    try:
        return HTP_ARCHS[arch]
    except KeyError:
        raise KeyError(
            f"unknown Hexagon HTP arch {arch!r} (registered: {', '.join(f'v{a}' for a in HTP_ARCHS)})"
        ) from None


def backend_support(name: str) -> BackendSupport:
    """The registered support of `name`; KeyError names the registered backends."""
    try:
        return BACKENDS[name]  # type: ignore[index]  # a str checked against the registry here
    except KeyError:
        raise KeyError(f"unknown NPU backend {name!r} (registered: {', '.join(BACKENDS)})") from None


def open_backend(name: str, **options: object) -> NpuBackend:
    """The implementation of backend `name`, constructed with `options` (ort-cpu: `npu_threads`;
    qnn-htp: `htp_arch`, `soc_model`). Its module is imported now, not before: onnxruntime and the
    QNN plugin are heavy and a profile check must not load them."""
    support = backend_support(name)
    module = importlib.import_module(support.module)
    backend: NpuBackend = getattr(module, support.factory)(**options)
    return backend
