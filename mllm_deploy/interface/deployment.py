"""A deployment: a profile loaded (from a file, a bundle or the built-in default), resolved
against its device and model once, and planned. Every front end starts here.

    deployment = load_deployment("profiles/sd8gen3.toml", ["prefill.chunk_size=128"])
    deployment.resolved        # what will run (raises UserError: exit 2 invalid, 3 cannot run here)
    deployment.plan            # the execution plan (built on first use)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

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
        """Resolve `loaded` (once); raises UserError when the device cannot run it (exit 3)."""
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


def load_deployment(profile_arg: str | None, overrides: Sequence[str] = ()) -> Deployment:
    """Load the profile named by `profile_arg` (a TOML file, a bundle directory, or None for the
    built-in default) with `overrides`, then resolve it; raises UserError (exit 2 or 3)."""
    return Deployment.of(load_profile(profile_arg, list(overrides)), profile_arg, overrides)
