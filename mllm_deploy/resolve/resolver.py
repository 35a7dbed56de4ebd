"""Second validation pass: can this (valid) profile run this model on this device?

Entry point: `resolve(loaded, caps, spec) -> Resolved`. Every refusal names the profile key
(located in the profile file) and the device or model limit; all refusals are reported at
once as a UserError with exit code 3 (cannot run on this device). Nothing heavy runs here:
the model is known by its metadata (ModelSpec) only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mllm_deploy.backends.registry import backend_support
from mllm_deploy.device import load_capabilities
from mllm_deploy.device.models import Capabilities
from mllm_deploy.errors import Diagnostic, ExitCode, UserError
from mllm_deploy.model import read_spec
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.profile.loaded import LoadedProfile
from mllm_deploy.profile.models import Profile
from mllm_deploy.resolve.checks import (
    Checks,
    check_architecture,
    check_attention,
    check_backend,
    check_context,
    check_dtypes,
    check_files,
    check_memory,
    check_placement,
    check_threads,
    silu_mul_on_cpu_here,
)
from mllm_deploy.resolve.choices import Backend, backend_label, choose_backend, choose_threads, usable_cores
from mllm_deploy.resolve.memory import MemoryBudget, memory_budget


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
        return max(1, min(self.cpu_threads + self.npu_threads, usable_cores(self.caps)))


def resolve(loaded: LoadedProfile, caps: Capabilities, spec: ModelSpec) -> Resolved:
    """Check `loaded` against `caps` and `spec`; return what will run or raise UserError."""
    profile = loaded.profile
    c = Checks(loaded)
    c.warnings.extend(loaded.warnings)
    backend = choose_backend(profile, caps)
    check_backend(c, profile, caps, backend)
    check_architecture(c, spec, backend)
    if backend != "none" and caps.npu is not None:
        check_dtypes(c, profile, caps, backend)
    check_placement(c, profile, caps, backend)
    check_attention(c, profile, backend)
    check_context(c, profile, caps, spec, backend)
    check_threads(c, profile, caps, backend)
    silu_mul_on_cpu = silu_mul_on_cpu_here(c, caps, backend)
    budget = memory_budget(profile, spec, backend)
    check_memory(c, caps, budget)
    check_files(c, profile, loaded.base_dir)
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
