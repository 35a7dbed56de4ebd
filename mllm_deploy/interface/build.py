"""Build a deployment's artifacts (and optionally a bundle), and the plan as `plan` shows it.

built = build_deployment(deployment, force=False, out=Path("bundle/"))
print(built.report)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mllm_deploy.compile.artifacts import Artifacts
from mllm_deploy.compile.build import compile_artifacts, find_artifacts
from mllm_deploy.compile.bundle import write_archive, write_bundle
from mllm_deploy.compile.bundle_check import read_lock
from mllm_deploy.compile.bundle_contents import render_bundle_contents
from mllm_deploy.compile.bundle_latency import timed_off_device
from mllm_deploy.compile.calibration import render_calibration
from mllm_deploy.events import report_progress
from mllm_deploy.interface.accuracy import gate_accuracy, measure_accuracy, render_accuracy
from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.interface.engines import obtain_decode_graphs
from mllm_deploy.plan import Plan, build_plan
from mllm_deploy.resolve import Resolved


@dataclass(frozen=True)
class Built:
    """What `build` produced: the verified artifacts, the bundle if one was written, a report."""

    artifacts: Artifacts
    bundle: Path | None
    report: str


def build_deployment(
    deployment: Deployment,
    *,
    force: bool = False,
    out: Path | None = None,
    archive: bool = False,
    force_accuracy: bool = False,
) -> Built:
    """Calibrate, compile, audit and profile the deployment's NPU graphs (or reuse the verified
    cache entry; `force` rebuilds it), then, when `out` is given, measure the bundle's accuracy
    (`interface.accuracy`: refused with exit 4 over `[accuracy] max_ppl_ratio` unless
    `force_accuracy`, before anything is written) and write the bundle with its decode graphs
    (`archive`: and `OUT.tar` of it). The gate applies to bundles only: a cache entry is this
    machine's own, and `eval` measures it on any text."""
    resolved = deployment.resolved
    artifacts = compile_artifacts(resolved, force=force)
    lock = artifacts.lock
    latencies = artifacts.latencies_ms
    htp = f" (htp v{lock.htp_arch}, soc {lock.soc_model})" if lock.htp_arch else ""
    lines = [
        f"artifacts: {artifacts.root}",
        f"backend: {resolved.backend_label}; chunk {lock.chunk_size}; target {lock.target}{htp}",
        render_calibration(artifacts.calibration).rstrip("\n"),
        f"graphs: {len(latencies)}, latency sum {sum(latencies.values()):.1f} ms per chunk "
        f"({_profiled_where(resolved)})",
    ]
    bundle = None
    if out is not None:
        accuracy = gate_accuracy(measure_accuracy(resolved, artifacts), resolved, force=force_accuracy)
        lines.append(render_accuracy(accuracy))
        stage = "writing the bundle (decode graphs, files" + (", archive)" if archive else ")")
        steps = 3 if archive else 2
        report_progress(stage, 0, steps)
        decode_graphs = obtain_decode_graphs(resolved)
        report_progress(stage, 1, steps)
        bundle = write_bundle(resolved, artifacts, out, decode_graphs=decode_graphs, accuracy=accuracy)
        report_progress(stage, 2, steps)
        lines += [f"bundle: {bundle}", render_bundle_contents(read_lock(bundle.resolve()))]
        if archive:
            tar = write_archive(bundle)
            report_progress(stage, 3, steps)
            lines.append(f"archive: {tar} ({tar.stat().st_size / 1e6:.1f} MB; unpack with `tar xf {tar.name}`)")
    return Built(artifacts, bundle, "\n".join(lines) + "\n")


def _profiled_where(resolved: Resolved) -> str:
    """Where the build's graph latencies come from, said truthfully: a qnn-htp target built on a
    machine without a Hexagon NPU is not timed (Qualcomm's x86 simulator is not its speed)."""
    if timed_off_device(resolved):
        return (
            "the device cost model: each graph's INT8 operations at the target's nominal TOPS; not timed "
            "on Qualcomm's x86 HTP simulator, which is hundreds of times slower than the device"
        )
    return "measured at build on this machine; noisy on a shared machine"


@dataclass(frozen=True)
class PlanView:
    """What `plan` shows: the plan, and the calibration report once `build` has calibrated."""

    plan: Plan
    calibration_report: str | None  # None: not built yet (shadowed inputs are provisional)


def deployment_plan(
    deployment: Deployment, *, prompt_tokens: int | None = None, dump_dir: Path | None = None
) -> PlanView:
    """The plan `plan` prints: once `build` has calibrated this profile, it shows the shadowed
    inputs it measured (else the provisional ones); nothing is built here."""
    resolved = deployment.resolved
    artifacts = find_artifacts(resolved)
    calibrated = tuple(artifacts.calibration.shadow_inputs) if artifacts is not None else None
    plan = build_plan(resolved, prompt_tokens=prompt_tokens, calibrated_shadow_inputs=calibrated, dump_dir=dump_dir)
    report = render_calibration(artifacts.calibration) if artifacts is not None else None
    return PlanView(plan, report)
