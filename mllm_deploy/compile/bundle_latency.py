"""Where a bundle's scheduler latencies come from: never from a simulator.

The DAG scheduler is seeded with a latency per NPU graph (`artifacts/latencies.json`, layer/kind
-> ms) and refines it with what it measures. A build on the target's own kind of machine (an
`ort-cpu` bundle built on the host) profiles the real graphs there. A `qnn-htp` bundle built on
an x86 host has only Qualcomm's HTP simulator to time, 200-700x slower than a phone, so its
bundle ships instead the **device cost model**: each graph's INT8 operations (the plan's op
counts) at the target's nominal peak INT8 TOPS from the device catalog — a lower bound, right
in proportion between graphs, which is what the scheduler's ordering needs. On the device, the
first run profiles every graph and stores `latencies.soc<N>.json` next to the bundle (not one of
its hashed files; `runtime.device_latency`), which seeds every later run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from mllm_deploy.backends.registry import backend_support
from mllm_deploy.device.probe import probe_host
from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.model.linears import GRAPH_KINDS
from mllm_deploy.plan import build_plan
from mllm_deploy.resolve import Resolved

LatencySource = Literal["build-host", "device-cost-model"]


class BundleLatencies(BaseModel):
    """What seeds the scheduler of a bundle (`bundle.json` `latencies`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    source: LatencySource
    """`build-host`: profiled at build on the machine the bundle targets (ort-cpu); `device-cost-model`:
    the target's nominal INT8 TOPS x each graph's operations (a qnn-htp bundle built off the device)."""
    detail: str
    """How they were obtained, in words."""


def _tops(resolved: Resolved) -> float:
    """The target's nominal INT8 TOPS; a located refusal (exit 3) when the catalog has none."""
    npu = resolved.caps.npu
    tops = npu.int8_tops if npu is not None else None
    if npu is None or not tops:
        raise user_error(
            f"device {resolved.caps.id} has no npu.int8_tops: a {resolved.backend} bundle built off the device "
            "needs it for its scheduler's latencies (the simulator's timings are not the device's)",
            key="npu.int8_tops", exit_code=ExitCode.CANNOT_RUN,
            hint="add the NPU's nominal INT8 TOPS to the device's [npu] table",
        )  # fmt: skip
    return float(tops)


def device_cost_model_ms(resolved: Resolved) -> dict[str, float]:
    """layer/kind -> ms of every NPU graph of one chunk: its INT8 operations (the plan's op counts)
    at the target's nominal INT8 TOPS (the plan's estimate_ms, unrounded)."""
    tops = _tops(resolved)
    plan = build_plan(resolved, prompt_tokens=resolved.profile.prefill.chunk_size)
    return {
        f"{s.layer}/{s.kind}": s.ops / (tops * 1e12) * 1e3
        for s in plan.subgraphs
        if s.chunk == 0 and s.processor == "npu" and s.kind in GRAPH_KINDS
    }


def timed_off_device(resolved: Resolved) -> bool:
    """Whether timing `resolved`'s graphs here would time Qualcomm's simulator, not the device:
    a context-binary backend on a machine without a Hexagon NPU."""
    return backend_support(resolved.backend).context_binaries and probe_host().qnn_htp_mode != "device"


def bundle_latencies(resolved: Resolved, profiled_ms: dict[str, float]) -> tuple[dict[str, float], BundleLatencies]:
    """The latencies (layer/kind -> ms) a bundle of `resolved` ships, and where they come from.
    `profiled_ms`: the artifacts' own, measured at build on this machine's backend."""
    if not timed_off_device(resolved):  # timed where it runs: the host, or the NPU itself
        return profiled_ms, BundleLatencies(
            source="build-host",
            detail=f"profiled at build on {resolved.backend_label} (median of timed runs per graph)",
        )
    modelled = device_cost_model_ms(resolved)
    npu, tops = resolved.caps.npu, _tops(resolved)
    assert npu is not None
    detail = (
        f"device cost model: each graph's INT8 operations (the plan's op counts, chunk "
        f"{resolved.profile.prefill.chunk_size}) at {resolved.caps.name}'s nominal {tops:g} INT8 TOPS "
        f"(device catalog {resolved.caps.id}); a lower bound, not a measurement. Replaced by "
        f"latencies.soc{npu.qnn_soc_model}.json once the bundle has run on the device"
    )
    # a graph the plan places elsewhere still exists; it keeps the kind's mean (LatencyModel's fallback)
    return {key: modelled[key] for key in profiled_ms if key in modelled}, BundleLatencies(
        source="device-cost-model", detail=detail
    )
