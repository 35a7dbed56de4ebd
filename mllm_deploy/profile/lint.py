"""Warnings evident from the profile alone: keys that are set but have no effect.

Each check is a pure function of the profile and the set of explicitly written keys, so
a default value never warns; only something the user wrote (in the file or with --set).
"""

from __future__ import annotations

from collections.abc import Callable

from mllm_deploy.backends.registry import BACKENDS
from mllm_deploy.errors import Diagnostic, Location
from mllm_deploy.profile.models import Profile

Where = Callable[[str], Location]  # dotted key -> Diagnostic kwargs file, line, col, key

_FLOAT_ONLY_SECTIONS = ("quantization", "outliers", "scheduler", "calibration")
_SAMPLING_KEYS = ("decode.top_k", "decode.top_p", "decode.seed")


def _set_under(explicit: frozenset[str], section: str) -> list[str]:
    return sorted(key for key in explicit if key.startswith(section + "."))


def _npu_threads(profile: Profile, explicit: frozenset[str]) -> list[tuple[str, str]]:
    backend = profile.device.npu_backend
    if backend == "auto" or "device.npu_threads" not in explicit:
        return []
    if backend == "none" or not BACKENDS[backend].uses_npu_threads:
        emulated = ", ".join(f'"{b.name}"' for b in BACKENDS.values() if b.uses_npu_threads)
        return [
            (
                "device.npu_threads",
                f'has no effect with device.npu_backend = "{backend}"; it only sets the threads of the emulated NPU ({emulated})',
            )
        ]
    return []


def _float_baseline(profile: Profile, explicit: frozenset[str]) -> list[tuple[str, str]]:
    if profile.device.npu_backend != "none":
        return []
    reason = 'has no effect with device.npu_backend = "none": everything runs in float32 on the CPU'
    found = [(key, reason) for section in _FLOAT_ONLY_SECTIONS for key in _set_under(explicit, section)]
    for kind in ("attention", "norms", "lm_head"):
        if getattr(profile.placement, kind) == "npu":
            found.append((f"placement.{kind}", reason))
    return found


def _outlier_knobs(profile: Profile, explicit: frozenset[str]) -> list[tuple[str, str]]:
    if profile.device.npu_backend == "none":
        return []  # already reported by _float_baseline
    policy = profile.outliers.policy
    unused = []
    if policy != "shadow":
        unused += ["outliers.hot_channel_fraction", "outliers.prune_fraction"]
    if policy == "none":
        unused.append("outliers.scale_percentile")
    return [(key, f'has no effect with outliers.policy = "{policy}"') for key in unused if key in explicit]


def _greedy_sampling(profile: Profile, explicit: frozenset[str]) -> list[tuple[str, str]]:
    if profile.decode.temperature != 0:
        return []
    return [
        (key, "has no effect with decode.temperature = 0 (greedy decoding)")
        for key in _SAMPLING_KEYS
        if key in explicit
    ]


CHECKS = (_npu_threads, _float_baseline, _outlier_knobs, _greedy_sampling)


def profile_warnings(profile: Profile, explicit: frozenset[str], where: Where) -> list[Diagnostic]:
    """Every warning for `profile`, located with `where(dotted_key)`."""
    found = [item for check in CHECKS for item in check(profile, explicit)]
    return [Diagnostic(message=message, severity="warning", **where(key)) for key, message in found]
