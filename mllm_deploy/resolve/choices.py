"""What the resolver chooses for a profile on a device: the backend that plays the NPU, its label,
and the threads of each processor."""

from __future__ import annotations

from typing import Literal

from mllm_deploy.backends.registry import NpuBackendName, backend_support
from mllm_deploy.device.models import Capabilities
from mllm_deploy.profile.models import Profile

Backend = Literal[NpuBackendName, "none"]  # a registered NPU backend, or none: float32 on the CPU


def choose_backend(profile: Profile, caps: Capabilities) -> Backend:
    """The backend `device.npu_backend` means on this device (`auto` resolved)."""
    wanted = profile.device.npu_backend
    if wanted != "auto":
        return wanted
    if caps.npu is None or caps.auto_backend is None:
        return "none"
    return caps.auto_backend


def backend_label(backend: Backend, caps: Capabilities) -> str:
    """What really plays the NPU, in the words the UI and reports use."""
    if backend == "none":
        return "none (float32 on the CPU)"
    probe = caps.probe
    support = backend_support(backend)
    if support.uses_npu_threads:  # emulated on CPU cores: name the integer units that run it
        if probe is not None and probe.has_amx_int8:
            units = "AMX INT8"
        elif probe is not None and (probe.has_avx512_vnni or probe.has_avx_vnni):
            units = "VNNI INT8"
        else:
            units = "CPU integer kernels"
        return f"{support.name} emulation ({units})"
    arch = caps.npu.htp_arch if caps.npu is not None and caps.npu.htp_arch else None
    if probe is not None and probe.qnn_htp_mode == "simulator":
        return "QNN HTP x86 simulator" + (f" {arch}" if arch else "")
    return "QNN HTP" + (f" {arch}" if arch else "")


def usable_cores(caps: Capabilities) -> int:
    return caps.probe.usable_cpus if caps.probe is not None else caps.cpu_cores


def choose_threads(profile: Profile, caps: Capabilities, backend: Backend) -> tuple[int, int]:
    """(cpu_threads, npu_threads) for unset counts. On ort-cpu the emulated NPU gets half the
    cores and the CPU side all of them: the CPU side (attention, shadow corrections) is the
    busier processor and the NPU idles part of the time, so sharing a core measured faster
    (`bench`, 1,024-token prompt, out-of-order on 2 cores: cpu 2 / npu 1 745 tok/s, cpu 1 / npu 1
    549 tok/s)."""
    cores = max(1, usable_cores(caps))
    if backend == "none" or not backend_support(backend).uses_npu_threads:
        return profile.device.cpu_threads or cores, 0
    npu = profile.device.npu_threads or max(1, cores // 2)
    cpu = profile.device.cpu_threads or cores
    return cpu, npu
