"""Which execution paths this build can run. The one place that decides it.

Until the NPU path (compiled INT8 graphs + scheduler) exists, only `device.npu_backend =
"none"` runs: the whole model in float32 on the CPU. Every other value is refused with exit
code 3 rather than silently running float.
"""

from __future__ import annotations

from mllm_deploy.errors import Diagnostic, ExitCode, UserError

RUNNABLE_NPU_BACKENDS = ("none",)
FLOAT_ENGINE_NAME = "cpu-float32-numpy"  # what runs for npu_backend = "none"


def require_runnable_backend(loaded_profile) -> str:
    """The backend that will really run for this profile, or UserError (exit 3).

    `loaded_profile` is a LoadedProfile (its `.where()` locates the key in the file).
    """
    backend = loaded_profile.profile.device.npu_backend
    if backend in RUNNABLE_NPU_BACKENDS:
        return backend
    diagnostic = Diagnostic(
        message="the NPU path is not available yet in this version of mllm-deploy; "
        "only the float32 CPU engine runs",
        value=backend,
        allowed=", ".join(repr(b) for b in RUNNABLE_NPU_BACKENDS),
        hint="use --set device.npu_backend=none to run the model in float32 on the CPU",
        **loaded_profile.where("device.npu_backend"),
    )
    raise UserError([diagnostic], exit_code=ExitCode.CANNOT_RUN)
