"""Obtain what an engine needs (artifacts from a bundle or a build, decode graphs), then open it.

This is the one place the pipeline's build side meets its run side: the runtime never compiles.

    weights = load_deployment_weights(deployment.resolved)
    engine = open_deployment_engine(deployment, weights)   # float32, or the NPU path, as it runs here
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mllm_deploy.backends.registry import backend_support
from mllm_deploy.compile.artifacts import Artifacts
from mllm_deploy.compile.build import Log, compile_artifacts, stderr_log
from mllm_deploy.compile.bundle_check import bundle_artifacts, bundle_decode_graphs, bundle_root
from mllm_deploy.compile.context_check import check_context_compatibility
from mllm_deploy.compile.decode_cache import cached_decode_graphs
from mllm_deploy.device import OptIn, this_machine
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.model import load_weights
from mllm_deploy.model.spec import LlamaWeights
from mllm_deploy.resolve import Resolved
from mllm_deploy.runtime.dag_engine import open_npu_engine, profile_chunk_attention, profile_kv_scales
from mllm_deploy.runtime.engine import Engine
from mllm_deploy.runtime.npu_kernels import NpuPrefillEngine, load_npu_kernels

if TYPE_CHECKING:
    from mllm_deploy.interface.deployment import Deployment


def obtain_artifacts(
    resolved: Resolved, *, log: Log = stderr_log, opt_in: OptIn | None = None, contexts: bool = True
) -> Artifacts:
    """The NPU artifacts of `resolved` (the target's plan): a bundle's own when the profile comes
    from a bundle (never rebuilt: a bundle that does not fit is refused; `opt_in`: see
    `open_bundle`), else the verified cache entry, built now (with progress on stderr) when there
    is none; `contexts=False` when what runs here loads no context binaries (an emulation), so
    none are compiled."""
    return bundle_artifacts(resolved, opt_in=opt_in) or compile_artifacts(resolved, log=log, contexts=contexts)


def obtain_decode_graphs(
    resolved: Resolved, weights: LlamaWeights | None = None, *, opt_in: OptIn | None = None
) -> Path:
    """The directory of the CPU decode graphs for the profile's `decode.weight_block` and
    `weight_bits`: a bundle's own when the profile comes from a bundle (never built), else the
    cache entry, built from the float weights (`weights`, or loaded now) the first time."""
    bundled = bundle_decode_graphs(resolved, opt_in=opt_in)
    if bundled is not None:
        return bundled
    load = (lambda: weights) if weights is not None else (lambda: load_weights(resolved.spec))
    decode = resolved.profile.decode
    return cached_decode_graphs(resolved.spec, load, decode.weight_block, decode.weight_bits)


def load_deployment_weights(resolved: Resolved) -> LlamaWeights:
    """The float weights an engine of `resolved` reads: from the weight cache (dequantized once and
    written there) for a profile, but on demand from the bundled model for a bundle, which writes
    nothing (its NPU path reads only embedding rows and norms: the graphs hold the linears)."""
    from_bundle = bundle_root(resolved) is not None
    return load_weights(resolved.spec, use_cache=not from_bundle, on_demand=from_bundle)


def open_engine(
    resolved: Resolved,
    weights: LlamaWeights,
    *,
    log: Log = stderr_log,
    target: Resolved | None = None,
    opt_in: OptIn | None = None,
) -> Engine:
    """The float engine for `npu_backend = "none"`, else the NPU path (DAG prefill + INT8 decode);
    warmed up either way. `resolved` is what runs here (`Deployment.running`: this machine's
    labels and threads, ort-cpu for an emulation); `target` the plan whose artifacts it runs
    (default: `resolved`); `opt_in` lets a Hexagon bundle open without a Hexagon NPU."""
    if resolved.backend == "none":
        engine = FloatEngine(weights)
        engine.warm_up()
        return engine
    built = target if target is not None else resolved
    loads_contexts = backend_support(resolved.backend).context_binaries  # what runs here, not the target
    artifacts = obtain_artifacts(built, log=log, opt_in=opt_in, contexts=loads_contexts)
    check_loadable(resolved, artifacts)
    return open_npu_engine(resolved, weights, artifacts, obtain_decode_graphs(built, weights, opt_in=opt_in))


def check_loadable(resolved: Resolved, artifacts: Artifacts) -> None:
    """Before QNN context binaries load: the arch/SoC each records matches its lockfile and this
    machine's Hexagon NPU (`check_context_compatibility`; UserError exit 3 naming the file)."""
    if backend_support(resolved.backend).context_binaries:
        check_context_compatibility(artifacts, this_machine())


def open_deployment_engine(deployment: Deployment, weights: LlamaWeights, *, log: Log = stderr_log) -> Engine:
    """`open_engine` for a deployment as it runs on this machine (UserError, exit 3, when it cannot
    without an opt-in: see `Deployment.running`)."""
    return open_engine(deployment.running, weights, log=log, target=deployment.resolved, opt_in=deployment.opt_in)


def open_eval_engine(
    resolved: Resolved,
    float_engine: FloatEngine,
    artifacts: Artifacts | None = None,
    *,
    target: Resolved | None = None,
    opt_in: OptIn | None = None,
) -> NpuPrefillEngine:
    """What `eval` measures on the NPU path: the profile's INT8 graphs and shadow corrections run
    one after the other (no scheduler) over the profile's KV cache and attention. `artifacts`:
    these (e.g. a qnn-htp entry's QDQ graphs run on ort-cpu), else those of `target` (default:
    `resolved`; see `open_engine` for `target` and `opt_in`)."""
    if artifacts is None:
        contexts = backend_support(resolved.backend).context_binaries
        artifacts = obtain_artifacts(target if target is not None else resolved, opt_in=opt_in, contexts=contexts)
    check_loadable(resolved, artifacts)
    kv_scales = profile_kv_scales(resolved, artifacts)
    attention = profile_chunk_attention(resolved, kv_scales)
    return NpuPrefillEngine(
        float_engine, load_npu_kernels(resolved, artifacts), kv_scales=kv_scales, chunk_attention=attention
    )
