"""Second validation pass: can this (valid) profile run this model on this device?

Entry point: `resolve(loaded, caps, spec) -> Resolved`. Every refusal names the profile key
(located in the profile file) and the device or model limit; all refusals are reported at
once as a UserError with exit code 3 (cannot run on this device). Nothing heavy runs here:
the model is known by its metadata (ModelSpec) only.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mllm_deploy.backends.registry import BACKENDS, HTP_ARCHS, NpuBackendName, backend_support
from mllm_deploy.device import load_capabilities
from mllm_deploy.device.models import Capabilities
from mllm_deploy.errors import Diagnostic, ExitCode, UserError
from mllm_deploy.model import read_spec
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.profile.loaded import LoadedProfile
from mllm_deploy.profile.models import Profile
from mllm_deploy.resolve.memory import MemoryBudget, memory_budget

Backend = Literal[NpuBackendName, "none"]  # a registered NPU backend, or none: float32 on the CPU

RAM_SHARE_LIMIT = 0.8
"""Largest share of device RAM a plan may claim; the OS and other apps need the rest."""


@dataclass(frozen=True)
class Resolved:
    """A profile checked against a device and a model: what will really run."""

    loaded: LoadedProfile
    caps: Capabilities
    spec: ModelSpec
    backend: Backend  # `auto` resolved
    backend_label: str  # e.g. "ort-cpu emulation (AMX INT8)", "QNN HTP v75", "none (float32 CPU)"
    cpu_threads: int
    npu_threads: int  # threads onnxruntime may use for the emulated NPU (ort-cpu only; else 0)
    memory: MemoryBudget
    warnings: list[Diagnostic] = field(default_factory=list)
    silu_mul_on_cpu: bool = False
    """Every layer's gate_up graph returns gate and up and SiLU·mul runs on the CPU, because the
    target's HTP generation has no float arithmetic inside a graph (`backends.registry.HTP_ARCHS`);
    otherwise only shadowed gate_up inputs split (their correction must enter before SiLU)."""

    @property
    def profile(self) -> Profile:
        return self.loaded.profile

    @property
    def uses_npu(self) -> bool:
        return self.backend != "none"

    def npu_backend_options(self) -> dict[str, object]:
        """Options to open this plan's NPU backend with (`backends.registry.open_backend`): the
        emulated NPU's threads, or the target's HTP architecture and SoC id."""
        support = backend_support(self.backend)
        if support.needs_htp_arch:
            npu = self.caps.npu
            assert npu is not None and npu.htp_arch_number is not None  # refused by the resolver otherwise
            return {"htp_arch": npu.htp_arch_number, "soc_model": npu.qnn_soc_model}
        return {"npu_threads": max(1, self.npu_threads)}

    @property
    def decode_threads(self) -> int:
        """Threads of the CPU decode: both processors' threads (between prefills the emulated NPU's
        cores are idle, and on a phone the NPU is not a CPU core at all), never more than the
        usable cores — decode runs alone, and a thread beyond the cores only waits its turn."""
        return max(1, min(self.cpu_threads + self.npu_threads, _usable_cores(self.caps)))


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"


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


def _usable_cores(caps: Capabilities) -> int:
    return caps.probe.usable_cpus if caps.probe is not None else caps.cpu_cores


def choose_threads(profile: Profile, caps: Capabilities, backend: Backend) -> tuple[int, int]:
    """(cpu_threads, npu_threads) for unset counts. On ort-cpu the emulated NPU gets half the
    cores and the CPU side all of them: the CPU side (attention, shadow corrections) is the
    busier processor and the NPU idles part of the time, so sharing a core measured faster
    (`bench`, 1,024-token prompt, out-of-order on 2 cores: cpu 2 / npu 1 745 tok/s, cpu 1 / npu 1
    549 tok/s)."""
    cores = max(1, _usable_cores(caps))
    if backend == "none" or not backend_support(backend).uses_npu_threads:
        return profile.device.cpu_threads or cores, 0
    npu = profile.device.npu_threads or max(1, cores // 2)
    cpu = profile.device.cpu_threads or cores
    return cpu, npu


class _Checks:
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


def _check_backend(c: _Checks, profile: Profile, caps: Capabilities, backend: Backend) -> None:
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


def _check_dtypes(c: _Checks, profile: Profile, caps: Capabilities, backend: NpuBackendName) -> None:
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


def _silu_mul_on_cpu(c: _Checks, caps: Capabilities, backend: Backend) -> bool:
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


def _check_placement(c: _Checks, profile: Profile, caps: Capabilities, backend: Backend) -> None:
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


def _check_attention(c: _Checks, profile: Profile, backend: Backend) -> None:
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


def _check_context(c: _Checks, profile: Profile, caps: Capabilities, spec: ModelSpec, backend: Backend) -> None:
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


def _check_threads(c: _Checks, profile: Profile, caps: Capabilities, backend: Backend) -> None:
    cores = _usable_cores(caps)
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


def _check_memory(c: _Checks, caps: Capabilities, budget: MemoryBudget) -> None:
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


def _check_files(c: _Checks, profile: Profile, base_dir: Path) -> None:
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


def resolve(loaded: LoadedProfile, caps: Capabilities, spec: ModelSpec) -> Resolved:
    """Check `loaded` against `caps` and `spec`; return what will run or raise UserError."""
    profile = loaded.profile
    c = _Checks(loaded)
    c.warnings.extend(loaded.warnings)
    backend = choose_backend(profile, caps)
    _check_backend(c, profile, caps, backend)
    if backend != "none" and caps.npu is not None:
        _check_dtypes(c, profile, caps, backend)
    _check_placement(c, profile, caps, backend)
    _check_attention(c, profile, backend)
    _check_context(c, profile, caps, spec, backend)
    _check_threads(c, profile, caps, backend)
    silu_mul_on_cpu = _silu_mul_on_cpu(c, caps, backend)
    budget = memory_budget(profile, spec, backend)
    _check_memory(c, caps, budget)
    _check_files(c, profile, loaded.base_dir)
    if c.invalid:
        raise UserError(c.invalid + c.refusals, exit_code=ExitCode.INVALID, warnings=c.warnings)
    if c.refusals:
        raise UserError(c.refusals, exit_code=ExitCode.CANNOT_RUN, warnings=c.warnings)
    cpu_threads, npu_threads = choose_threads(profile, caps, backend)
    return Resolved(
        loaded=loaded,
        caps=caps,
        spec=spec,
        backend=backend,
        backend_label=backend_label(backend, caps),
        cpu_threads=cpu_threads,
        npu_threads=npu_threads,
        memory=budget,
        warnings=c.warnings,
        silu_mul_on_cpu=silu_mul_on_cpu,
    )


def resolve_profile(loaded: LoadedProfile) -> Resolved:
    """Load the device and model metadata a profile names, then :func:`resolve`."""
    problems: list[UserError] = []
    caps: Capabilities | None = None
    spec: ModelSpec | None = None
    try:
        caps = load_capabilities(loaded.profile.device.target)
    except UserError as err:
        problems.append(_relocate(err, loaded, "device.target"))
    try:
        spec = read_spec(loaded.profile.model.source, loaded.base_dir)
    except UserError as err:
        problems.append(_relocate(err, loaded, "model.source"))
    if problems:
        raise UserError(
            [d for p in problems for d in p.diagnostics], exit_code=ExitCode.INVALID, warnings=list(loaded.warnings)
        )
    if caps is None or spec is None:  # each is set unless its loader raised, which was reported above
        raise RuntimeError("resolve_profile: device or model metadata missing without a diagnostic")
    return resolve(loaded, caps, spec)


def _relocate(err: UserError, loaded: LoadedProfile, key: str) -> UserError:
    """Point diagnostics without a profile location at `key` in the profile file."""
    where = loaded.where(key)
    fixed = []
    for d in err.diagnostics:
        if d.line is None and (d.file is None or d.key == key):
            extra = f" ({d.file})" if d.file and d.file != where["file"] else ""
            fixed.append(Diagnostic(**{**d.__dict__, **where, "message": d.message + extra}))
        else:
            fixed.append(d)
    return UserError(fixed, exit_code=err.exit_code)
