"""`evaluate_profile(deployment, text) -> dict`: the profile's perplexity beside the float baseline."""

from __future__ import annotations

import time
from collections.abc import Callable

from threadpoolctl import threadpool_limits

from mllm_deploy.compile.bundle_check import bundle_root, read_lock
from mllm_deploy.errors import UserError, user_error
from mllm_deploy.eval.reference import reference_weights
from mllm_deploy.events import report_progress
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.interface.engines import load_deployment_weights, open_eval_engine
from mllm_deploy.model import load_tokenizer
from mllm_deploy.model.spec import LlamaWeights
from mllm_deploy.resolve import Resolved
from mllm_deploy.runtime.perplexity import perplexity, token_nll


def evaluate_profile(
    deployment: Deployment, text: str, *, max_tokens: int = 4096, progress: bool = True, reference: str | None = None
) -> dict:
    """See `_evaluate`; numpy's BLAS runs on `cpu_threads` threads meanwhile (no oversubscription).
    `reference`: for a bundle whose model is trimmed, the model it was built from (the float32
    baseline's linears); without it an installed built-in model of the same identity is used, and
    with neither the report has no baseline (`baseline_perplexity` None) but the lockfile's
    build-time accuracy (`bundle_accuracy`)."""
    running = deployment.running  # as it runs here (UserError exit 3 when it cannot without an opt-in)
    with threadpool_limits(limits=max(1, running.cpu_threads), user_api="blas"):
        return _evaluate(running, text, max_tokens=max_tokens, progress=progress, deployment=deployment,
                         reference=reference)  # fmt: skip


def _baseline_weights(resolved: Resolved, path_weights: LlamaWeights, reference: str | None) -> LlamaWeights | None:
    """The float32 baseline's weights: the path's own, unless they come from a bundle's trimmed
    model (then the original model, or None when it is not on this machine and not given)."""
    root = bundle_root(resolved)
    if root is None:
        return path_weights
    lock = read_lock(root)
    if not lock.model.trimmed and reference is None:
        return path_weights
    try:
        return reference_weights(root, lock, reference, command="eval")
    except UserError:
        if reference is not None:
            raise
        return None


def _evaluate(
    resolved: Resolved, text: str, *, max_tokens: int, progress: bool, deployment: Deployment, reference: str | None
) -> dict:
    """{perplexity, baseline_perplexity, tokens, outlier_fraction, backend, ...} on `text`'s first
    `max_tokens` tokens (at most prefill.max_context). The NPU path prefills with the profile's
    INT8 graphs + shadow outliers (sequentially) over the profile's KV cache (int8 by default);
    the baseline is the float32 engine. `resolved` is what runs here (`deployment.running`), over
    the artifacts of the deployment's target."""
    spec = resolved.spec
    ids = load_tokenizer(spec).encode(text, allow_special=False)
    limit = min(max_tokens, resolved.profile.prefill.max_context)
    ids = ids[:limit]
    if len(ids) < 2:
        raise user_error(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    chunk = resolved.profile.prefill.chunk_size
    path_weights = load_deployment_weights(resolved)
    float_engine = FloatEngine(path_weights)  # the path's embedding, norms and attention
    base_weights = _baseline_weights(resolved, path_weights, reference)
    n_chunks = -(-len(ids) // chunk)

    def show(stage: str) -> Callable[[int, int], None] | None:
        if not progress:
            return None
        report_progress(stage, 0, n_chunks)  # the stage starts (its ETA counts from here)
        return lambda done, total: report_progress(stage, done, total)

    started = time.perf_counter()
    baseline = None
    if base_weights is not None:
        base_engine = float_engine if base_weights is path_weights else FloatEngine(base_weights)
        baseline = perplexity(token_nll(base_engine, ids, chunk, show("eval: float baseline (chunks)")))
    base_s = time.perf_counter() - started
    report: dict = {"baseline_perplexity": baseline, "tokens": len(ids), "chunk_size": chunk}
    root = bundle_root(resolved)
    if root is not None:
        accuracy = read_lock(root).accuracy
        report["bundle_accuracy"] = accuracy.model_dump() if accuracy is not None else None
    if resolved.backend == "none":
        return {**report, "perplexity": baseline, "outlier_fraction": 0.0, "backend": "none (float32 on the CPU)",
                "seconds": base_s, "baseline_seconds": base_s}  # fmt: skip
    engine = open_eval_engine(resolved, float_engine, target=deployment.resolved, opt_in=deployment.opt_in)
    kernels = engine.kernels
    cache = engine.new_cache(len(ids))
    started = time.perf_counter()
    ppl = perplexity(token_nll(engine, ids, chunk, show("eval: NPU path (chunks)"), cache=cache))
    stats = kernels.stats()
    return {
        **report,
        "perplexity": ppl,
        "outlier_fraction": stats["outlier_fraction"],
        "backend": kernels.backend_label,
        "policy": resolved.profile.outliers.policy,
        "kv_cache": resolved.profile.decode.kv_cache,
        "attention": "int8" if engine.npu_engine.chunk_attention is not None else "float32",
        # share of the prompt's K/V values beyond the int8 cache's calibrated range (0 for float32)
        "kv_saturated_fraction": cache.saturated_values / cache.stored_values if cache.stored_values else 0.0,
        "shadowed_linears": len(kernels.shadowed),
        "shadow": stats,
        "seconds": time.perf_counter() - started,
        "baseline_seconds": base_s,
    }
