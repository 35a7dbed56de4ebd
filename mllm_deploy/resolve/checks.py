"""The resolver's checks: each one compares part of a profile with the device, the backend and
the model, and records a located refusal (exit 3), input error (exit 2) or warning in `Checks`.
`resolver.resolve` runs them in order and raises them all at once.
"""

from __future__ import annotations

import glob
from pathlib import Path

from mllm_deploy.backends.registry import BACKENDS, HTP_ARCHS, NpuBackendName, backend_support
from mllm_deploy.device.models import Capabilities
from mllm_deploy.errors import Diagnostic
from mllm_deploy.model.architectures import ARCHITECTURES, npu_architectures
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.profile.loaded import LoadedProfile
from mllm_deploy.profile.models import Profile
from mllm_deploy.resolve.choices import Backend, usable_cores
from mllm_deploy.resolve.memory import MemoryBudget

RAM_SHARE_LIMIT = 0.8
"""Largest share of device RAM a plan may claim; the OS and other apps need the rest."""


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"


class Checks:
    """Collects refusals (exit 3), input errors (exit 2) and warnings, located in the profile."""

    def __init__(self, loaded: LoadedProfile) -> None:
        self.loaded = loaded
        self.refusals: list[Diagnostic] = []
        self.invalid: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []

    def refuse(self, key: str, message: str, value: object, allowed: str, hint: str | None = None) -> None:
        self.refusals.append(
            Diagnostic(message=message, value=value, allowed=allowed, hint=hint, **self.loaded.where(key))
        )

    def bad_input(self, key: str, message: str, value: object, allowed: str | None = None) -> None:
        self.invalid.append(Diagnostic(message=message, value=value, allowed=allowed, **self.loaded.where(key)))

    def warn(self, key: str, message: str, value: object = None) -> None:
        self.warnings.append(Diagnostic(message=message, value=value, severity="warning", **self.loaded.where(key)))


def check_backend(c: Checks, profile: Profile, caps: Capabilities, backend: Backend) -> None:
    wanted = profile.device.npu_backend
    if backend == "none":
        if wanted == "auto":
            c.warn("device.npu_backend", f"{caps.id} has no NPU backend; everything runs in float32 on the CPU")
        return
    if caps.npu is None:
        c.refuse("device.npu_backend", f"{caps.id} has no NPU", wanted, "none")
        return
    if backend not in caps.backends:
        allowed = ", ".join([*caps.backends, "none"])
        c.refuse("device.npu_backend", f"backend {backend!r} is not available on {caps.id}", wanted, allowed)
        return
    support = backend_support(backend)
    if support.needs_htp_arch and caps.npu.htp_arch_number is None:
        c.refuse(
            "device.npu_backend",
            f"{backend} compiles for a Hexagon HTP architecture and {caps.id}'s catalog entry names none",
            wanted,
            ", ".join(name for name in caps.backends if not BACKENDS[name].needs_htp_arch) or "none",
            hint='choose a catalogued Snapdragon (`mllm-deploy devices`), e.g. device.target = "sd8gen3", or another backend',
        )
    if support.needs_htp_arch and caps.probe is not None and caps.probe.qnn_htp_mode == "simulator":
        c.warn(
            "device.npu_backend",
            "QNN HTP on this machine is Qualcomm's x86 simulator: correct, but 200-700x slower "
            "than the CPU; use it to check graphs, not for speed",
            wanted,
        )


def check_architecture(c: Checks, spec: ModelSpec, backend: Backend) -> None:
    """The NPU path implements only some architectures' blocks (model.architectures)."""
    family = ARCHITECTURES.get(spec.architecture)
    if backend != "none" and family is not None and not family.npu_path:
        c.refuse(
            "model.source",
            f"the NPU path does not implement the {spec.architecture} architecture yet (it runs in float32 only)",
            spec.architecture,
            ", ".join(npu_architectures()),
            hint='set device.npu_backend = "none" to run it on the CPU in float32',
        )


def check_dtypes(c: Checks, profile: Profile, caps: Capabilities, backend: NpuBackendName) -> None:
    npu = caps.npu
    assert npu is not None
    q = profile.quantization
    support = BACKENDS[backend]
    if q.activations not in support.activations:
        allowed = ", ".join(sorted(support.activations))
        c.refuse("quantization.activations", f"{backend} has no graphs for these activations", q.activations, allowed)
    if q.weights not in support.weights:
        allowed = ", ".join(sorted(support.weights))
        c.refuse("quantization.weights", f"{backend} has no graphs for these weights", q.weights, allowed)
    arch = HTP_ARCHS.get(npu.htp_arch_number or 0) if support.needs_htp_arch else None
    if q.activations == "uint16" and not (npu.supports_int16_activations and (arch is None or arch.int16_activations)):
        c.refuse(
            "quantization.activations",
            f"{caps.id}'s NPU has no 16-bit activations" + (f" (HTP v{arch.arch}: {arch.source})" if arch else ""),
            q.activations,
            "uint8",
        )
    if q.activations == "uint8" and support.quantized_outputs and (arch is None or arch.int16_activations):
        c.warn(
            "quantization.activations",
            f"{backend} re-quantizes every linear output on the NPU, and uint8 outputs cost far more accuracy "
            "than the host's path (docs/deploy.md, per-target accuracy); uint16 (A16W8) keeps the target "
            "as accurate as the host",
            q.activations,
        )
    if q.weights == "int8-per-channel" and not npu.supports_per_channel_weights:
        c.refuse(
            "quantization.weights",
            f"{caps.id}'s NPU has no per-channel weight quantization",
            q.weights,
            "int8-per-tensor",
        )


def silu_mul_on_cpu_here(c: Checks, caps: Capabilities, backend: Backend) -> bool:
    """True (with a note) when the target's HTP generation cannot run gate_up's float SiLU·mul:
    the graphs are then built with gate and up as outputs and the CPU applies SiLU·mul — re-placed
    here, before anything is built, rather than refused or left to fail in QNN's compiler."""
    if backend == "none" or not backend_support(backend).needs_htp_arch or caps.npu is None:
        return False
    arch = HTP_ARCHS.get(caps.npu.htp_arch_number or 0)
    if arch is None or arch.float_elementwise:
        return False
    c.warn(
        "device.target",
        f"HTP v{arch.arch} of {caps.id} has no float arithmetic inside a graph, so gate_up's SiLU·mul "
        "cannot run on the NPU: every layer's gate_up graph returns gate and up, and SiLU·mul runs on the CPU",
    )
    return True


def check_placement(c: Checks, profile: Profile, caps: Capabilities, backend: Backend) -> None:
    placement = profile.placement
    if placement.attention == "npu":
        c.refuse(
            "placement.attention",
            "attention cannot run on the NPU: it has dynamic shapes (a chunk against every "
            "earlier token) and needs float softmax",
            "npu",
            "cpu",
        )
    if placement.norms == "npu" and backend != "none":
        npu = caps.npu
        if npu is not None and not npu.supports_fp16:
            c.refuse(
                "placement.norms",
                f"RMSNorm needs float math and {caps.id}'s NPU has no float16",
                "npu",
                "cpu",
            )
        elif "norms" not in backend_support(backend).npu_roles:
            c.refuse(
                "placement.norms",
                f"{backend} builds no norm graphs: the compiler puts only the linear layers on the NPU",
                "npu",
                "cpu",
            )
    if placement.lm_head == "npu" and backend != "none" and "lm_head" not in backend_support(backend).npu_roles:
        c.refuse(
            "placement.lm_head",
            f"{backend} builds no output-head graph: the compiler puts only the linear layers of the blocks "
            "on the NPU, and the head runs on the CPU",
            "npu",
            "cpu",
        )
    if backend == "none":
        for key in ("norms", "lm_head"):
            if getattr(placement, key) == "npu" and c.loaded.is_explicit(f"placement.{key}"):
                c.warn(
                    f"placement.{key}",
                    'has no effect with device.npu_backend = "none": everything runs on the CPU',
                    "npu",
                )


def check_attention(c: Checks, profile: Profile, backend: Backend) -> None:
    if profile.prefill.attention != "int8":
        return
    if backend == "none":
        if c.loaded.is_explicit("prefill.attention"):
            c.warn(
                "prefill.attention",
                'has no effect with device.npu_backend = "none": the float baseline attends in float32',
                "int8",
            )
    elif profile.decode.kv_cache != "int8":
        c.refuse(
            "prefill.attention",
            "int8 attention reads the int8 KV cache, and decode.kv_cache is float32",
            "int8",
            'float32, or decode.kv_cache = "int8"',
        )


def check_context(c: Checks, profile: Profile, caps: Capabilities, spec: ModelSpec, backend: Backend) -> None:
    prefill = profile.prefill
    if prefill.max_context > spec.context:
        c.refuse(
            "prefill.max_context",
            f"longer than the model's context length ({spec.name}: {spec.context} tokens)",
            prefill.max_context,
            f"<= {spec.context}",
        )
    if backend != "none" and prefill.chunk_size > prefill.max_context:  # the float path clamps its chunks
        c.refuse(
            "prefill.chunk_size",
            "a chunk cannot hold more tokens than the context",
            prefill.chunk_size,
            f"<= prefill.max_context ({prefill.max_context})",
        )
    if backend != "none" and not caps.chunk_size_allowed(prefill.chunk_size):
        c.refuse(
            "prefill.chunk_size",
            f"chunk size not allowed on {caps.id}'s NPU",
            prefill.chunk_size,
            caps.chunk_size_rule(),
        )
    tail = prefill.tail_chunk_size
    if backend != "none" and 0 < tail < prefill.chunk_size and not caps.chunk_size_allowed(tail):
        c.refuse(
            "prefill.tail_chunk_size",
            f"tail chunk size not allowed on {caps.id}'s NPU",
            tail,
            f"0 (off) or {caps.chunk_size_rule()}",
        )


def check_threads(c: Checks, profile: Profile, caps: Capabilities, backend: Backend) -> None:
    cores = usable_cores(caps)
    device = profile.device
    for key in ("cpu_threads", "npu_threads"):
        value = getattr(device, key)
        if value is not None and value > cores:
            c.refuse(f"device.{key}", f"more threads than {caps.id} has cores", value, f"<= {cores}")
    emulated = backend != "none" and backend_support(backend).uses_npu_threads
    if emulated and device.cpu_threads and device.npu_threads and device.cpu_threads + device.npu_threads > cores:
        c.warn(
            "device.cpu_threads",
            f"cpu_threads + npu_threads = {device.cpu_threads + device.npu_threads} > {cores} cores: "
            "the two processors will compete for cores",
        )


def check_memory(c: Checks, caps: Capabilities, budget: MemoryBudget) -> None:
    npu = caps.npu
    if (
        npu is not None
        and budget.npu_bytes
        and npu.addressable_memory_bytes
        and budget.npu_bytes > npu.addressable_memory_bytes
    ):
        c.refuse(
            "prefill.chunk_size",
            f"NPU graphs, weights and buffers need {_gib(budget.npu_bytes)}, more than {caps.id}'s NPU can address",
            None,
            f"<= {_gib(npu.addressable_memory_bytes)}",
            hint="use a smaller chunk_size or model",
        )
    limit = int(caps.ram_bytes * RAM_SHARE_LIMIT)
    if caps.ram_bytes and budget.total_bytes > limit:
        c.refuse(
            "prefill.max_context",
            f"weights + KV cache + activations need {_gib(budget.total_bytes)} "
            f"(KV cache {_gib(budget.kv_cache_bytes)}), more than {int(RAM_SHARE_LIMIT * 100)}% of "
            f"{caps.id}'s RAM ({_gib(caps.ram_bytes)})",
            None,
            f"<= {_gib(limit)}",
            hint="lower prefill.max_context or use a smaller model",
        )


def check_files(c: Checks, profile: Profile, base_dir: Path) -> None:
    template = profile.model.chat_template
    if template != "auto":
        path = Path(template).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            c.bad_input(
                "model.chat_template", f"chat template file not found: {path}", template, "auto or a Jinja file"
            )
    source = profile.calibration.source
    if source != "self":
        pattern = Path(source).expanduser()
        pattern = pattern if pattern.is_absolute() else base_dir / pattern
        if not [p for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file()]:
            c.bad_input(
                "calibration.source", f"no text files match {pattern}", source, "self, or a text file path or glob"
            )
