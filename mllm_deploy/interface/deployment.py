"""A deployment: a profile loaded (from a file, a bundle or the built-in default), resolved
against its device and model once, and planned. Every front end starts here.

    deployment = load_deployment("profiles/sd8gen3.toml", ["prefill.chunk_size=128"])
    deployment.resolved        # what will run (raises UserError: exit 2 invalid, 3 cannot run here)
    deployment.plan            # the execution plan (built on first use)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from mllm_deploy.compile.bundle import ARTIFACTS_DIR, BUNDLE_INFO, BUNDLE_PROFILE, is_bundle
from mllm_deploy.compile.bundle_check import open_bundle
from mllm_deploy.errors import Diagnostic, ExitCode, UserError, user_error
from mllm_deploy.plan import Plan, build_plan
from mllm_deploy.profile import LoadedProfile, load_profile
from mllm_deploy.profile.models import Profile
from mllm_deploy.resolve import Resolved, resolve_profile


@dataclass(frozen=True)
class Deployment:
    """A valid profile resolved for its device and model: what will really run."""

    loaded: LoadedProfile
    resolved: Resolved
    profile_arg: str | None = None  # the PROFILE argument (None: the built-in default profile)
    overrides: tuple[str, ...] = field(default=())  # every --set / /set KEY=VALUE so far, in order

    @classmethod
    def of(cls, loaded: LoadedProfile, profile_arg: str | None = None, overrides: Sequence[str] = ()) -> Deployment:
        """Resolve `loaded` (once); raises UserError when the device cannot run it (exit 3), or
        when an override would change a bundle's built graphs (exit 2)."""
        if loaded.base_dir is not None and is_bundle(loaded.base_dir):
            refuse_bundle_graph_overrides(loaded)
        return cls(loaded, resolve_profile(loaded), profile_arg, tuple(overrides))

    @property
    def profile(self) -> Profile:
        return self.loaded.profile

    @cached_property
    def plan(self) -> Plan:
        """The execution plan for the default prompt length (what `plan` prints)."""
        return build_plan(self.resolved)

    @property
    def backend(self) -> str:
        """What really runs: "none" (float32 on the CPU) or the NPU backend's label, e.g.
        "ort-cpu emulation (AMX INT8)"."""
        return "none" if self.resolved.backend == "none" else self.resolved.backend_label

    @property
    def npu_label(self) -> str:
        """What plays the NPU, as the UI labels its lane: `NPU · <resolved backend label>`."""
        return f"NPU · {self.resolved.backend_label}"

    @property
    def cpu_label(self) -> str:
        if self.resolved.uses_npu:
            return f"CPU · {self.resolved.cpu_threads} thread(s)"
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
)
"""Keys (or sections, ending in a dot) a bundle's graphs were built with: `--set` may not change
them on a bundle (it ships the decode step graph of its own KV cache and weight block only).
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


def load_deployment_profile(profile_arg: str | None, overrides: Sequence[str] = ()) -> LoadedProfile:
    """The profile named by `profile_arg` (a TOML file, a bundle directory, or None for the built-in
    default) with `overrides`. A bundle is verified first (`compile.bundle_check.open_bundle`: its
    lockfile, every file's size and sha256, formats, library versions, target), so a damaged or
    foreign bundle is refused before anything is read from it; its warnings join the profile's."""
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
            bundle = open_bundle(path)
            loaded = load_profile(profile_arg, list(overrides))
            return replace(loaded, warnings=[*bundle.warnings, *loaded.warnings])
    return load_profile(profile_arg, list(overrides))


def load_deployment(profile_arg: str | None, overrides: Sequence[str] = ()) -> Deployment:
    """Load the profile named by `profile_arg` (a TOML file, a bundle directory, or None for the
    built-in default) with `overrides` (see `load_deployment_profile`), then resolve it; raises
    UserError (exit 2 or 3)."""
    return Deployment.of(load_deployment_profile(profile_arg, overrides), profile_arg, overrides)
