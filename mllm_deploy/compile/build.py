"""`compile_artifacts(resolved) -> Artifacts`: calibrate, build, audit, (QNN-)compile and profile
every NPU graph of a profile, or reuse the verified cache entry.

    lock = expected_lock(resolved)           # what the entry must have been built from
    entry = artifacts_root() / entry_key(lock)
    open_entry(entry, lock)                  # hit: verified files → Artifacts
    else: calibrate (stats cached separately) → derive clamps/shadow layers → per layer:
          graphs → audit (refuse float) → [QNN context binary] → shadow W^T rows
          → profile latencies on the backend → manifest → atomic rename
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

from mllm_deploy.backends.base import ContextCompiler, NpuBackend
from mllm_deploy.backends.registry import backend_support, open_backend
from mllm_deploy.compile.artifacts import (
    CALIBRATION,
    KERNELS,
    LATENCIES,
    LOCK,
    Artifacts,
    EntryProblem,
    Lockfile,
    artifacts_root,
    commit_entry,
    entry_key,
    expected_lock,
    load_stats,
    open_entry,
    stats_key,
    store_stats,
    write_manifest,
)  # fmt: skip
from mllm_deploy.compile.audit import GraphAuditError, audit_graph, integer_kernel_report
from mllm_deploy.compile.bundle import is_bundle
from mllm_deploy.compile.bundle_latency import device_cost_model_ms, timed_off_device
from mllm_deploy.compile.calibrate import collect_activation_stats
from mllm_deploy.compile.calibration import ActivationStats, CalibrationResult, derive_calibration, render_calibration
from mllm_deploy.compile.calibration_text import Progress, calibration_tokens
from mllm_deploy.compile.graphs import LayerActQuant, build_layer_graphs
from mllm_deploy.compile.parallel import BuildPool
from mllm_deploy.compile.quantize import ActQuant, WeightGranularity, activation_quant_symmetric
from mllm_deploy.compile.shadow_store import gguf_sources, write_shadow_rows
from mllm_deploy.errors import Diagnostic, ExitCode, UserError, user_error
from mllm_deploy.events import current_reporter
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.model import load_tokenizer, load_weights
from mllm_deploy.model.gguf_file import GGUFFile
from mllm_deploy.model.linears import GRAPH_KINDS, LINEAR_GROUP, LINEAR_GROUPS
from mllm_deploy.model.spec import LayerWeights
from mllm_deploy.paths import atomic_write_bytes, atomic_write_text, cache_dir, make_build_dir
from mllm_deploy.resolve.memory import shadowed_input_count

if TYPE_CHECKING:
    from mllm_deploy.resolve import Resolved

Log = Callable[[str], None]
PROFILE_RUNS = 3  # timed runs per graph after one warm-up (one on the QNN simulator)


def stderr_log(message: str) -> None:
    """To the front end's progress reporter (events.reporting) when one is installed, else stderr."""
    reporter = current_reporter()
    if reporter is not None:
        reporter.note(message)
        return
    print(message, file=sys.stderr, flush=True)


def stderr_progress(stage: str, done: int, total: int) -> None:
    """To the front end's progress reporter (events.reporting) when one is installed; else
    `stage: done/total` on one line of a terminal, start and end lines otherwise."""
    reporter = current_reporter()
    if reporter is not None:
        reporter.progress(stage, done, total)
        return
    if sys.stderr.isatty():
        end = "\n" if done >= total else ""
        print(f"\r{stage}: {done}/{total}", end=end, file=sys.stderr, flush=True)
    elif done == 0 or done >= total:
        print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)


def layer_act_quant(cal: CalibrationResult, layer: int, quantize_outputs: bool = True) -> LayerActQuant:
    """The calibrated grids of one layer's graphs: inputs, and every linear output when
    `quantize_outputs` (QNN HTP needs the Q/DQ unit; on ort-cpu the output stays float, which
    onnxruntime runs as MatMulIntegerToFloat: the int32 accumulator scaled to float, no uint8
    rounding of the output — measured on SmolLM2, per-tensor uint8 *outputs* alone cost ~30%
    perplexity)."""
    dtype = cal.activations

    def grid(clamp: float) -> ActQuant:
        return activation_quant_symmetric(clamp, dtype)

    return LayerActQuant(
        attn_in=grid(cal.input(layer, "qkv").clamp),
        attn_out=grid(cal.input(layer, "o_proj").clamp),
        mlp_in=grid(cal.input(layer, "gate_up").clamp),
        down_in=grid(cal.input(layer, "down").clamp),
        outputs={
            name: grid(cal.output_clamps[f"{layer}/{name}"]) if quantize_outputs else None
            for group in LINEAR_GROUPS
            for name in group.linears
        },
    )


def shadow_weight_t(layer_weights: LayerWeights, kind: str) -> np.ndarray:
    """float32 W^T [in, out_total] of the linears reading one graph input, outputs in graph order."""
    mats = [np.asarray(m) for m in LINEAR_GROUP[kind].weight_arrays(layer_weights)]
    return np.ascontiguousarray(np.concatenate(mats, axis=0).T, dtype=np.float32)


def find_artifacts(resolved: Resolved) -> Artifacts | None:
    """The verified cache entry of `resolved`, or None (nothing is built)."""
    if resolved.backend == "none":
        return None

    base = resolved.loaded.base_dir
    try:
        if base is not None and is_bundle(base):  # verified as a whole when it was opened (bundle_check)
            return open_entry(Path(base) / "artifacts", None, verify_checksums=False)
        lock = expected_lock(resolved)
        return open_entry(artifacts_root() / entry_key(lock), lock, verify_checksums=False)
    except EntryProblem:
        return None


def calibrated_shadow_inputs(resolved: Resolved) -> tuple[tuple[int, str], ...] | None:
    """The (layer, kind) linear inputs this profile's built artifacts shadow, for `build_plan`."""
    artifacts = find_artifacts(resolved)
    return tuple(artifacts.calibration.shadow_inputs) if artifacts is not None else None


def compile_artifacts(
    resolved: Resolved,
    *,
    force: bool = False,
    log: Log = stderr_log,
    progress: Progress = stderr_progress,
    contexts: bool = True,
) -> Artifacts:
    """The profile's artifacts from the cache, or built now (see the module docstring).
    `contexts=False`: the caller loads only the QDQ graphs (`--emulate` of a qnn-htp target), so
    an entry built now holds no context binaries; one that lacks them is rebuilt when they are asked for."""
    if resolved.backend == "none":
        raise user_error("device.npu_backend = \"none\" runs everything in float on the CPU: nothing to compile",
                         exit_code=ExitCode.INVALID, **resolved.loaded.where("device.npu_backend"))  # fmt: skip
    lock = expected_lock(resolved)
    final = artifacts_root() / entry_key(lock)
    if not force:
        try:
            entry = open_entry(final, lock)
            if not (contexts and backend_support(resolved.backend).context_binaries and not has_contexts(entry)):
                return entry
            log(f"artifact cache entry {final.name} holds no context binaries (built for --emulate); recompiling")
        except EntryProblem as problem:
            if final.exists():
                log(f"artifact cache entry {final.name} rejected: {problem}; recompiling")
    started = time.perf_counter()

    engine = FloatEngine(load_weights(resolved.spec))
    stats = calibration_stats(resolved, engine, lock, log, progress)
    p = resolved.profile

    cal = derive_calibration(
        stats, policy=p.outliers.policy, activations=p.quantization.activations,
        hot_channel_fraction=p.outliers.hot_channel_fraction, shadow_input_count=shadowed_input_count(p, resolved.spec),
    )  # fmt: skip
    log(render_calibration(cal).rstrip())
    tmp = make_build_dir(artifacts_root(), final.name)
    try:
        _build_into(tmp, resolved, engine, cal, progress, log, contexts)
        atomic_write_text(tmp / LOCK, lock.model_dump_json(indent=1))
        write_manifest(
            tmp,
            time.perf_counter() - started,
            resolved.npu_threads if backend_support(resolved.backend).uses_npu_threads else 0,
        )
        commit_entry(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"compiled {len(GRAPH_KINDS) * resolved.spec.n_layers} graphs for {resolved.backend_label} "
        f"in {time.perf_counter() - started:.1f} s → {final}")  # fmt: skip
    return open_entry(final, lock, verify_checksums=False)


def calibration_stats(
    resolved: Resolved, engine: FloatEngine, lock: Lockfile, log: Log, progress: Progress
) -> ActivationStats:
    """Cached ActivationStats for the model + calibration data + percentile, or computed now."""
    key = stats_key(lock)
    stats = load_stats(key)
    if stats is not None:
        return stats

    p = resolved.profile
    started = time.perf_counter()
    # numpy's BLAS on one thread, whatever cpu_threads says: multithreaded BLAS sums in another
    # order, so the self-generated calibration text could diverge with the thread setting and
    # the same profile build different artifacts; and its spinning threads oversubscribe a busy
    # machine (2 threads on 2 shared cores made calibration ~30x slower). The cores are used by
    # splitting the work instead, into parts computed exactly as on one thread (compile.parallel).
    blas = threadpool_limits(limits=1, user_api="blas")
    log(f"calibrating on {p.calibration.samples} x {p.calibration.tokens_per_sample} tokens "
        f"from {p.calibration.source!r} (once per model and calibration settings)")  # fmt: skip
    try:
        with BuildPool() as pool:
            samples = _cached_samples(lock, lambda: calibration_tokens(
                p, load_tokenizer(resolved.spec), engine, resolved.loaded.base_dir, resolved.loaded.where, progress, pool
            ))  # fmt: skip
            stats = collect_activation_stats(engine, samples, p.outliers.scale_percentile, source=p.calibration.source,
                                             chunk_size=p.prefill.chunk_size, progress=progress, started=started, pool=pool)  # fmt: skip
    finally:
        blas.restore_original_limits()
    store_stats(key, stats)
    return stats


def _cached_samples(lock: Lockfile, produce: Callable[[], list[list[int]]]) -> list[list[int]]:
    """Calibration token ids, cached by model and calibration settings (not the percentile):
    self-generated text is the slow part of calibration and does not depend on it."""

    s = lock.settings
    parts = [
        lock.model_identity,
        s["calibration.source"],
        s["calibration.samples"],
        s["calibration.tokens_per_sample"],
        lock.versions["mllm-deploy"],
    ]
    path = cache_dir() / "calibration" / ("tokens-" + hashlib.sha256(repr(parts).encode()).hexdigest()[:24] + ".json")
    try:
        cached: object = json.loads(path.read_text())
        if isinstance(cached, list) and all(isinstance(x, list) and x for x in cached):
            return cached
    except (OSError, ValueError):
        pass
    samples = produce()
    atomic_write_bytes(path, json.dumps(samples).encode())
    return samples


def _audit_or_refuse(resolved: Resolved, graph_path: Path, *, require_quantized_outputs: bool) -> None:
    """The graph audit; a refused graph stops the build as a refusal of the profile (exit 3),
    located at its quantization settings (the build directory is discarded, nothing is cached)."""
    try:
        audit_graph(graph_path, require_quantized_outputs=require_quantized_outputs)
    except GraphAuditError as err:
        settings = resolved.profile.quantization
        raise UserError([Diagnostic(
            message=f"the compiled graph {err.graph} was refused by the audit: " + "; ".join(err.problems),
            value=f"weights={settings.weights}, activations={settings.activations}",
            allowed=f"graphs whose every linear runs on integer kernels of {resolved.backend_label}",
            hint="nothing was cached; try other quantization settings, or report the model and profile",
            **resolved.loaded.where("quantization"),
        )], exit_code=ExitCode.CANNOT_RUN) from None  # fmt: skip


def has_contexts(entry: Artifacts) -> bool:
    """Whether a cache entry holds QNN context binaries (a qnn-htp entry built for --emulate does not)."""
    return any(rel.startswith("contexts/") for rel in entry.manifest.files)


def _build_into(
    tmp: Path,
    resolved: Resolved,
    engine: FloatEngine,
    cal: CalibrationResult,
    progress: Progress,
    log: Log,
    contexts: bool = True,
) -> None:
    spec, p = resolved.spec, resolved.profile
    chunk = p.prefill.chunk_size
    granularity: WeightGranularity = "per-channel" if p.quantization.weights == "int8-per-channel" else "per-tensor"
    backend = open_backend(resolved.backend, **resolved.npu_backend_options())
    shadowed = cal.shadowed
    support = backend_support(resolved.backend)
    latencies: dict[str, float] = {}
    off_device = timed_off_device(resolved)  # a qnn-htp target built on x86: the device cost model instead
    gfile = GGUFFile(Path(spec.path)) if spec.format == "gguf" else None  # shadow rows keep the model's blocks
    for layer in range(spec.n_layers):
        progress("building graphs", layer, spec.n_layers)
        weights = engine.weights.layers[layer]
        built = build_layer_graphs(weights, layer, chunk, layer_act_quant(cal, layer, quantize_outputs=support.quantized_outputs), granularity,
                                   tmp / "graphs", split_gate_up=split_gate_up(resolved, shadowed, layer))  # fmt: skip
        for kind, graph in built.items():
            _audit_or_refuse(resolved, graph.path, require_quantized_outputs=support.quantized_outputs)
            if (layer, kind) in shadowed:
                group = LINEAR_GROUP[kind]
                mats = tuple(np.asarray(m, np.float32) for m in group.weight_arrays(weights))
                write_shadow_rows(tmp, layer, kind, shadow_weight_t(weights, kind),
                                  np.asarray(cal.input(layer, kind).hot_channels, np.int64),
                                  gguf_sources(gfile, layer, group.linears, mats))  # fmt: skip
            run_path = graph.path
            if support.context_binaries and not contexts and off_device:  # emulated here: the graphs alone
                continue  # (its latencies are the device cost model's, below)
            if support.context_binaries:
                assert isinstance(backend, ContextCompiler)
                run_path = backend.compile_context(graph.path, tmp / "contexts" / f"layer{layer}_{kind}.ctx.onnx")
            if off_device:  # the simulator's timings are not the device's (seconds a graph): load it, do not time it
                backend.load(run_path)
            else:  # one run on a context-binary backend (the device itself), else the median of several
                latencies[f"{layer}/{kind}"] = profile_graph(
                    backend, run_path, runs=1 if support.context_binaries else PROFILE_RUNS
                )
    progress("building graphs", spec.n_layers, spec.n_layers)
    if off_device:
        latencies = device_cost_model_ms(resolved)
    report = {kind: integer_kernel_report(tmp / "graphs" / f"layer0_{kind}.onnx") for kind in GRAPH_KINDS}
    if not all(r["all_linears_integer"] for r in report.values()):
        log("note: onnxruntime's CPU provider has no integer kernel for these graphs' activations "
            f"({p.quantization.activations}); on ort-cpu they run as float MatMulNBits (exact W8A16 values, not NPU speed)")  # fmt: skip
    atomic_write_text(tmp / KERNELS, json.dumps(report, indent=1))
    atomic_write_text(tmp / CALIBRATION, cal.model_dump_json(indent=1))
    atomic_write_text(tmp / LATENCIES, json.dumps(latencies, indent=1))


def split_gate_up(resolved: Resolved, shadowed: frozenset[tuple[int, str]], layer: int) -> bool:
    """Whether layer's gate_up graph returns gate and up (SiLU·mul on the CPU): for a shadowed
    input (the correction enters before SiLU), and on every layer where the resolver re-placed
    SiLU·mul on the CPU because the target's HTP generation has no float arithmetic."""
    return resolved.silu_mul_on_cpu or (layer, "gate_up") in shadowed


def profile_graph(backend: NpuBackend, path: Path, runs: int) -> float:
    """Median wall time (ms) of `runs` runs of the graph at `path` on random inputs, after a warm-up."""
    handle = backend.load(path)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in handle.inputs.items()}
    backend.run(handle, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        backend.run(handle, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))
