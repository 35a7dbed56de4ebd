"""What `up` runs: a profile loaded, resolved against its device and planned, ready to load.

No textual here; the CLI builds a :class:`Deployment` (printing any refusal before the UI
opens) and the app rebuilds one on every `/set`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm_deploy.plan import Plan, build_plan
from mllm_deploy.profile import LoadedProfile, load_profile
from mllm_deploy.resolve import Resolved, resolve_profile
from mllm_deploy.runtime.availability import require_runnable_backend


@dataclass(frozen=True)
class Deployment:
    """A valid, runnable profile with its resolution and plan."""

    profile_arg: str | None  # the PROFILE argument (None: the built-in default profile)
    overrides: tuple[str, ...]  # every --set / /set KEY=VALUE so far, in order
    loaded: LoadedProfile
    resolved: Resolved
    plan: Plan
    backend: str  # the backend that really runs (`none` = float32 engine on the CPU)

    @property
    def profile(self):
        return self.loaded.profile

    @property
    def npu_label(self) -> str:
        """What plays the NPU, as the UI labels its lane: `NPU · <resolved backend label>`."""
        return f"NPU · {self.resolved.backend_label}"

    @property
    def cpu_label(self) -> str:
        if self.resolved.uses_npu:
            return f"CPU · {self.resolved.cpu_threads} thread(s)"
        return "CPU · float32 engine"


def prepare_deployment(profile_arg: str | None, overrides: tuple[str, ...] | list[str] = ()) -> Deployment:
    """Load, resolve and plan; raises UserError (exit 2 invalid, 3 cannot run here)."""
    overrides = tuple(overrides)
    loaded = load_profile(profile_arg, overrides)
    resolved = resolve_profile(loaded)
    backend = require_runnable_backend(loaded)
    return Deployment(profile_arg, overrides, loaded, resolved, build_plan(resolved), backend)


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """A profile (or any nested dict) as `dotted.key -> value`."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def profile_values(deployment: Deployment) -> dict[str, object]:
    return flatten(deployment.profile.model_dump(mode="json"))
