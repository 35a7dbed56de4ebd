"""Which execution paths this build can run. The one place that decides it.

Every `device.npu_backend` runs: `none` is the whole model in float32 on the CPU; `ort-cpu`
and `qnn-htp` (and `auto`, resolved per host) prefill with the compiled INT8 graphs plus shadow
outlier correction and decode on the CPU. A profile the device cannot run is refused by the
resolver (exit 3) rather than silently run in float.
"""

from __future__ import annotations

RUNNABLE_NPU_BACKENDS = ("none", "auto", "ort-cpu", "qnn-htp")
FLOAT_ENGINE_NAME = "cpu-float32-numpy"  # what runs for npu_backend = "none"


def require_runnable_backend(loaded_profile) -> str:
    """What will really run for this profile: "none", or the resolved NPU backend's label
    (e.g. "ort-cpu emulation (AMX INT8)"). Raises UserError (exit 3) when the device cannot run it.

    `loaded_profile` is a LoadedProfile (its `.where()` locates the key in the file).
    """
    if loaded_profile.profile.device.npu_backend == "none":
        return "none"
    from mllm_deploy.resolve import resolve_profile

    resolved = resolve_profile(loaded_profile)
    return "none" if resolved.backend == "none" else resolved.backend_label
