"""Before QNN context binaries load: each records the HTP arch and SoC it was compiled for, and
that must be what its lockfile says and what this machine's Hexagon NPU is.

    check_context_compatibility(artifacts, this_machine())   # None, or UserError (exit 3)
"""

from __future__ import annotations

from mllm_deploy.compile.artifacts import Artifacts
from mllm_deploy.compile.bundle_refusal import REBUILD
from mllm_deploy.device.host import MachineHere
from mllm_deploy.errors import ExitCode, user_error


def check_context_compatibility(artifacts: Artifacts, machine: MachineHere) -> None:
    """Before a qnn-htp entry's or bundle's context binaries load: each records the HTP arch and
    SoC it was compiled for (`ep_compatibility_info` in its model metadata, read without loading
    the graph). A file that records none, or another arch/SoC than its lockfile (`htp_arch`,
    `soc_model`), or than this machine's Hexagon NPU, is refused (exit 3, naming the file, what it
    records and what was expected). On Qualcomm's x86 simulator (no Hexagon here) only the
    lockfile is compared: the simulator emulates the recorded arch, and the label says so
    ("QNN HTP simulator v75")."""
    # deferred on purpose: the reader lives with the QNN backend, whose module loads onnxruntime
    from mllm_deploy.backends.qnn_htp import read_context_compatibility  # noqa: PLC0415

    lock, hexagon = artifacts.lock, machine.hexagon
    files = sorted((artifacts.root / "contexts").glob("*.ctx.onnx"))
    if not files:
        raise user_error(f"{artifacts.root}: no QNN context binaries to load", file=str(artifacts.root / "contexts"),
                         exit_code=ExitCode.CANNOT_RUN, hint=REBUILD)  # fmt: skip
    for path in files:
        try:
            found = read_context_compatibility(path)
        except (OSError, ValueError) as exc:
            raise user_error(f"cannot read the context binary's metadata: {exc}", file=str(path),
                             exit_code=ExitCode.CANNOT_RUN, hint=REBUILD) from None  # fmt: skip
        if found is None or found.htp_arch is None:
            what = (
                "records no ep_compatibility_info"
                if found is None
                else f"records ep_compatibility_info {found.raw!r}, in a form this mllm-deploy does not read"
            )
            raise user_error(f"the context binary {what}: its target HTP arch and SoC cannot be checked",
                             file=str(path), key="ep_compatibility_info", exit_code=ExitCode.CANNOT_RUN, hint=REBUILD)  # fmt: skip
        recorded = f"HTP v{found.htp_arch}, SoC {found.soc_model if found.soc_model is not None else 'unset'}"
        if (found.htp_arch, found.soc_model) != (lock.htp_arch, lock.soc_model):
            raise user_error(
                f"the context binary was compiled for {recorded}; its lockfile says HTP v{lock.htp_arch}, SoC {lock.soc_model}",
                file=str(path), key="ep_compatibility_info", value=found.raw,
                allowed=f"htp_arch {lock.htp_arch}, soc_model {lock.soc_model}", exit_code=ExitCode.CANNOT_RUN, hint=REBUILD,
            )  # fmt: skip
        if hexagon is None:
            continue
        mismatch = (hexagon.htp_arch is not None and found.htp_arch != hexagon.htp_arch) or (
            hexagon.soc_model is not None and found.soc_model is not None and found.soc_model != hexagon.soc_model
        )
        if mismatch:
            device = f"HTP v{hexagon.htp_arch}, SoC {hexagon.soc_model} ({hexagon.part})"
            raise user_error(
                f"the context binary was compiled for {recorded}; this machine's Hexagon NPU is {device}",
                file=str(path), key="ep_compatibility_info", value=found.raw, allowed=device,
                exit_code=ExitCode.CANNOT_RUN, hint=f"build for this SoC: mllm-deploy build PROFILE --set "
                f"device.target={hexagon.catalog_id or 'TARGET'} --out DIR",
            )  # fmt: skip
