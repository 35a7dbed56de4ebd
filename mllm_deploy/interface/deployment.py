"""A deployment: a profile loaded (from a file, a bundle or the built-in default), resolved
against its device and model once, and planned. Every front end starts here.

    deployment = load_deployment("profiles/sd8gen3.toml", ["prefill.chunk_size=128"])
    deployment.resolved        # the profile's plan for its target (raises UserError: exit 2 invalid, 3 cannot run)
    deployment.plan            # the execution plan (built on first use)
    deployment.here            # how it runs on this machine (probed): labels, threads, or why it cannot
    deployment.running         # `resolved` as it runs here (UserError exit 3 if it cannot without an opt-in)

A `qnn-htp` profile or bundle needs a Hexagon NPU. On a machine without one, running it is refused
unless the caller opts in (`opt_in`): "emulate" runs the same QDQ graphs on onnxruntime's CPU
integer kernels (every label says emulation), "simulator" runs the context binaries on Qualcomm's
x86 HTP simulator (labelled; hundreds of times slower: for verification). Never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Literal

from mllm_deploy.backends.registry import BACKENDS, NpuBackendName, backend_support
from mllm_deploy.compile.bundle import ARTIFACTS_DIR, BUNDLE_INFO, BUNDLE_PROFILE, is_bundle
from mllm_deploy.compile.bundle_check import bundle_has_qdq_graphs, open_bundle
from mllm_deploy.device import HOST_ID, MachineHere, OptIn, this_machine
from mllm_deploy.errors import Diagnostic, ExitCode, UserError, user_error
from mllm_deploy.plan import Plan, build_plan
from mllm_deploy.profile import LoadedProfile, load_profile
from mllm_deploy.profile.models import Profile
from mllm_deploy.resolve import Resolved, resolve_profile

RunMode = Literal["native", "hexagon", "simulator", "emulation", "refused"]
"""How a deployment runs here: `native` (what it targets is this machine's CPU / ort-cpu path, or
float32 on the CPU), `hexagon` (a real Hexagon NPU), `simulator`, `emulation` (see OptIn), or
`refused` (it cannot run here as asked: `RunHere.refusal` says why)."""

SIMULATOR_COST = "200-700x slower than the CPU"

EMULATOR: NpuBackendName = next(
    name for name, support in BACKENDS.items() if support.uses_npu_threads and not support.needs_htp_arch
)
"""The registered backend `--emulate` runs a Hexagon target's QDQ graphs on: the one that emulates
an NPU on CPU cores and needs no HTP (ort-cpu)."""


@dataclass(frozen=True)
class RunHere:
    """How a deployment runs on this machine, in the words every label uses, or why it cannot."""

    mode: RunMode
    label: str  # what plays the NPU here, e.g. "QNN HTP simulator v75 (x86-64)"; "none (float32 on the CPU)"
    cpu_threads: int  # CPU threads really used here (the target's, capped at this machine's usable CPUs)
    npu_threads: int  # threads of the emulated NPU (ort-cpu, emulation); 0 otherwise
    target_cpu_threads: int  # the target's plan's CPU threads (may be more than this machine has)
    machine: str  # this machine, e.g. "x86_64 AMD EPYC, 2 usable CPU(s), AVX-512 VNNI; QNN HTP simulator (x86-64)"
    refusal: str | None = None  # why it cannot run here as asked (None: it can)
    hint: str | None = None  # what to do about the refusal
    notes: tuple[str, ...] = ()  # warnings worth printing (an opt-in that changes nothing, a slow simulator)

    @property
    def threads_label(self) -> str:
        """ "cpu 2 (target 8), npu 1": the threads used, and the target's when they differ."""
        target = f" (target {self.target_cpu_threads})" if self.target_cpu_threads != self.cpu_threads else ""
        return f"cpu {self.cpu_threads}{target}, npu {self.npu_threads}"

    @property
    def line(self) -> str:
        """The "on this machine" line `plan` prints."""
        if self.refusal is not None:
            return f"cannot run here: {self.refusal}" + (f"; {self.hint}" if self.hint else "")
        return f"runs as {self.label}; threads {self.threads_label}; machine: {self.machine}"


def run_here(
    resolved: Resolved, machine: MachineHere, opt_in: OptIn | None = None, *, bundle_has_graphs: bool = True
) -> RunHere:
    """How `resolved` (a profile's plan for its target) runs on `machine`, given the caller's
    `opt_in`. A `qnn-htp` target runs on a Hexagon NPU of the same HTP arch; elsewhere only with an
    opt-in. Threads are the target's, capped at this machine's usable CPUs. `bundle_has_graphs`:
    False for a bundle that ships context binaries only (nothing the CPU provider could emulate)."""
    usable = max(1, machine.usable_cpus)
    target = resolved.caps.id
    base = RunHere("native", resolved.backend_label, cpu_threads=min(resolved.cpu_threads, usable),
                   npu_threads=min(resolved.npu_threads, usable), target_cpu_threads=resolved.cpu_threads,
                   machine=machine.label)  # fmt: skip
    if resolved.backend == "none" or not backend_support(resolved.backend).needs_htp_arch:
        notes = (f"--{opt_in} has no effect: {target}'s plan runs no Hexagon graphs",) if opt_in else ()
        return replace(base, notes=notes)
    npu_caps = resolved.caps.npu
    arch = npu_caps.htp_arch_number if npu_caps is not None else None
    needs = f"{target} needs a Hexagon NPU (HTP v{arch})"
    emulate_hint = "use --emulate (the same graphs on the CPU, labelled emulation)"
    if opt_in == "emulate":
        emulation = replace(
            base,
            mode="emulation",
            label=f"{EMULATOR} emulation of {target}'s graphs ({_int8_units(machine)})",
            npu_threads=min(resolved.profile.device.npu_threads or max(1, usable // 2), usable),
        )
        if bundle_has_graphs:
            return emulation
        return replace(emulation, mode="refused",
                       refusal=f"--emulate: this {target} bundle ships QNN context binaries only, no QDQ graphs "
                       "the CPU provider could run",
                       hint="run it on the device, or with --simulator (verification), or emulate the profile "
                       "it was built from")  # fmt: skip
    hexagon = machine.hexagon
    if hexagon is not None:
        if hexagon.htp_arch is not None and hexagon.htp_arch != arch:
            build = f"build for this SoC (device.target = {hexagon.catalog_id!r}) or " if hexagon.catalog_id else ""
            return replace(base, mode="refused", label=hexagon.label,
                           refusal=f"{needs}; this machine's is {hexagon.label} ({hexagon.source})",
                           hint=f"{build}{emulate_hint}")  # fmt: skip
        return replace(
            base, mode="hexagon", label=f"QNN HTP v{arch} (Hexagon NPU, {hexagon.part or 'SoC not identified'})"
        )
    refusal = f"{needs}; this machine has {machine.label}"
    if opt_in == "simulator":
        if not machine.has_simulator:
            return replace(base, mode="refused", label=machine.npu_label,
                           refusal=f"{refusal} (no QNN HTP simulator either)", hint=emulate_hint)  # fmt: skip
        slow = f"QNN HTP on this machine is Qualcomm's x86 simulator ({SIMULATOR_COST}): for verification, not speed"
        sim = f"QNN HTP simulator v{arch} ({machine.probe.machine.replace('_', '-')})"
        return replace(base, mode="simulator", label=sim, notes=(slow,))
    sim_hint = (
        f" or --simulator (Qualcomm's HTP simulator, {SIMULATOR_COST}: verification)" if machine.has_simulator else ""
    )
    return replace(base, mode="refused", label=machine.npu_label, refusal=refusal, hint=emulate_hint + sim_hint)


def _int8_units(machine: MachineHere) -> str:
    probe = machine.probe
    if probe.has_amx_int8:
        return "AMX INT8"
    if probe.has_avx512_vnni or probe.has_avx_vnni:
        return "VNNI INT8"
    return "CPU integer kernels"


@dataclass(frozen=True)
class Deployment:
    """A valid profile resolved for its device and model (`resolved`: the target's plan), and how
    it runs on this machine (`here`, `running`)."""

    loaded: LoadedProfile
    resolved: Resolved
    profile_arg: str | None = None  # the PROFILE argument (None: the built-in default profile)
    overrides: tuple[str, ...] = field(default=())  # every --set / /set KEY=VALUE so far, in order
    opt_in: OptIn | None = None  # --emulate / --simulator: how a Hexagon target may run without one

    @classmethod
    def of(
        cls,
        loaded: LoadedProfile,
        profile_arg: str | None = None,
        overrides: Sequence[str] = (),
        *,
        opt_in: OptIn | None = None,
        to_run: bool = False,
    ) -> Deployment:
        """Resolve `loaded` (once); raises UserError when the device cannot run it (exit 3), or
        when an override would change a bundle's built graphs (exit 2). `to_run`: the caller will
        run it here (run, chat, bench, eval, up): refuse now (exit 3) what this machine cannot run
        without an `opt_in` (`plan` and `validate` describe the target and only say so)."""
        if loaded.base_dir is not None and is_bundle(loaded.base_dir):
            refuse_bundle_graph_overrides(loaded)
        deployment = cls(loaded, resolve_profile(loaded), profile_arg, tuple(overrides), opt_in)
        if to_run:
            deployment.check_runnable()
        return deployment

    @cached_property
    def machine(self) -> MachineHere:
        """This machine (probed once, cached on disk; see `device.probe`)."""
        return this_machine()

    @cached_property
    def here(self) -> RunHere:
        """How this deployment runs on this machine, or why it cannot (see `run_here`)."""
        base = self.loaded.base_dir
        graphs = not (base is not None and is_bundle(base)) or bundle_has_qdq_graphs(Path(base))
        return run_here(self.resolved, self.machine, self.opt_in, bundle_has_graphs=graphs)

    def check_runnable(self) -> RunHere:
        """`here`, or UserError (exit 3) naming the target and what this machine can run."""
        here = self.here
        if here.refusal is not None:
            raise user_error(here.refusal, **self.loaded.where("device.target"), value=self.resolved.caps.id,
                             hint=here.hint, exit_code=ExitCode.CANNOT_RUN)  # fmt: skip
        return here

    @cached_property
    def running(self) -> Resolved:
        """`resolved` as it runs here: this machine's probe in its capabilities, the label of what
        really runs, the threads really used, and for an emulation the ort-cpu backend (over the
        target's graphs: `open_engine(..., target=deployment.resolved)`). UserError (exit 3) when it
        cannot run here."""
        here = self.check_runnable()
        resolved = self.resolved
        if resolved.caps.id == HOST_ID and here.mode == "native":
            return resolved  # probed already: its labels and threads are this machine's
        caps = resolved.caps.model_copy(update={"probe": self.machine.probe})
        backend = EMULATOR if here.mode == "emulation" else resolved.backend
        return replace(resolved, caps=caps, backend=backend, backend_label=here.label,
                       cpu_threads=here.cpu_threads, npu_threads=here.npu_threads)  # fmt: skip

    @property
    def profile(self) -> Profile:
        return self.loaded.profile

    @cached_property
    def plan(self) -> Plan:
        """The execution plan for the default prompt length (what `plan` prints)."""
        return build_plan(self.resolved)

    @property
    def backend(self) -> str:
        """What really runs here: "none" (float32 on the CPU) or the label of what plays the NPU,
        e.g. "ort-cpu emulation (AMX INT8)", "QNN HTP simulator v75 (x86-64)"."""
        return "none" if self.resolved.backend == "none" else self.here.label

    @property
    def npu_label(self) -> str:
        """What plays the NPU here, as the UI labels its lane: `NPU · <label>`."""
        return f"NPU · {self.here.label}"

    @property
    def cpu_label(self) -> str:
        if self.resolved.uses_npu:
            here = self.here
            target = f" (target {here.target_cpu_threads})" if here.target_cpu_threads != here.cpu_threads else ""
            return f"CPU · {here.cpu_threads} thread(s){target}"
        return "CPU · float32 engine"


BUNDLE_FIXED_KEYS = (
    "model.",
    "device.target",
    "device.npu_backend",
    "prefill.chunk_size",
    "quantization.",
    "outliers.",
    "calibration.",
    "placement.",
    "decode.kv_cache",
    "decode.weight_block",
    "decode.weight_bits",
)
"""Keys (or sections, ending in a dot) a bundle's graphs were built with: `--set` may not change
them on a bundle (it ships the decode step graph of its own KV cache, weight block and bits only).
Runtime keys (threads, sampling, scheduler policy, context) stay settable."""


def refuse_bundle_graph_overrides(loaded: LoadedProfile) -> None:
    """UserError (exit 2) naming every `--set` of `loaded` that would change its bundle's graphs."""
    fixed = []
    for override in loaded.overrides:
        key = override.split("=", 1)[0].strip()
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in BUNDLE_FIXED_KEYS):
            fixed.append(Diagnostic(
                message=f"the bundle {loaded.base_dir} runs the graphs it was built with; this key cannot change on it",
                value=override.split("=", 1)[1].strip() if "=" in override else None,
                allowed="runtime keys only (threads, sampling, decode.max_new_tokens, scheduler.policy, prefill.max_context, ...)",
                hint=f"build a new bundle: mllm-deploy build PROFILE --set {override} --out DIR",
                **loaded.where(key),
            ))  # fmt: skip
    if fixed:
        raise UserError(fixed, exit_code=ExitCode.INVALID)


def load_deployment_profile(
    profile_arg: str | None, overrides: Sequence[str] = (), *, opt_in: OptIn | None = None
) -> LoadedProfile:
    """The profile named by `profile_arg` (a TOML file, a bundle directory, or None for the built-in
    default) with `overrides`. A bundle is verified first (`compile.bundle_check.open_bundle`: its
    lockfile, every file's size and sha256, formats, library versions, target), so a damaged or
    foreign bundle is refused before anything is read from it; its warnings join the profile's.
    `opt_in`: a Hexagon bundle may open on a machine without one (see `OptIn`)."""
    if profile_arg is not None:
        path = Path(profile_arg)
        if path.is_file() and path.name.endswith((".tar", ".tar.gz", ".tgz")):
            raise user_error("a bundle archive: unpack it first, then give the directory",
                             file=str(path), hint=f"tar xf {path}  (writes the bundle directory beside it)")  # fmt: skip
        if (
            path.is_dir()
            and not is_bundle(path)
            and (path / BUNDLE_PROFILE).is_file()
            and (path / ARTIFACTS_DIR).is_dir()
        ):
            raise user_error(f"bundle {path.resolve()}: its lockfile {BUNDLE_INFO} is missing",
                             file=str(path / BUNDLE_INFO), exit_code=ExitCode.CANNOT_RUN,
                             hint="copy the whole bundle again, or rebuild it: mllm-deploy build PROFILE --out DIR")  # fmt: skip
        if is_bundle(path):
            bundle = open_bundle(path, opt_in=opt_in)
            loaded = load_profile(profile_arg, list(overrides))
            return replace(loaded, warnings=[*bundle.warnings, *loaded.warnings])
    return load_profile(profile_arg, list(overrides))


def load_deployment(
    profile_arg: str | None,
    overrides: Sequence[str] = (),
    *,
    opt_in: OptIn | None = None,
    to_run: bool = False,
) -> Deployment:
    """Load the profile named by `profile_arg` (a TOML file, a bundle directory, or None for the
    built-in default) with `overrides` (see `load_deployment_profile`), then resolve it; raises
    UserError (exit 2 or 3). `opt_in`, `to_run`: see `Deployment.of`."""
    loaded = load_deployment_profile(profile_arg, overrides, opt_in=opt_in)
    return Deployment.of(loaded, profile_arg, overrides, opt_in=opt_in, to_run=to_run)
