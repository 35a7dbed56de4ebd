"""The host prices itself from what was measured here: the build's profiled graph latencies.

`build` times every INT8 graph of a profile on this machine's backend and stores the medians in its
cache entry (`latencies.json`, "layer/kind" -> ms). When the profile being estimated on `host` has
been built, those measurements replace the cost model's formula for the NPU graphs, and the plan
uses the shadowed inputs its calibration chose (as `plan` does). Without a build, or on a catalogued
device, the catalog's figures price everything and the row's `calibration` says so. The CPU-side
figures of the host's cost model were measured here too (their sources are in `host.toml`).
"""

from __future__ import annotations

from mllm_deploy.device.models import Capabilities
from mllm_deploy.resolve import Resolved


def measured_npu_latencies(
    resolved: Resolved, caps: Capabilities
) -> tuple[dict[str, float], str, tuple[tuple[int, str], ...] | None]:
    """(layer/kind -> ms measured at build, what prices this row, calibrated shadow inputs or None)."""
    catalog = f"{caps.id} cost model (device catalog; figures and sources in device/catalog/{caps.id}.toml)"
    if caps.id != "host" or resolved.backend == "none":
        return {}, catalog, None
    # deferred on purpose: finding a build brings the compiler's modules (onnx), only for the host
    from mllm_deploy.compile.build import find_artifacts  # noqa: PLC0415

    artifacts = find_artifacts(resolved)
    if artifacts is None:
        return {}, catalog + "; not built here, so no measured graph latencies (run `mllm-deploy build`)", None
    shadow = tuple(artifacts.calibration.shadow_inputs)
    label = (
        f"host: NPU graphs from the build's measured latencies ({len(artifacts.latencies_ms)} graphs, "
        f"{resolved.backend_label}); CPU side from host.toml's measured figures"
    )
    return dict(artifacts.latencies_ms), label, shadow
