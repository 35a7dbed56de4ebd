"""The accuracy gate of `build --out`: perplexity of the bundle's own path against the float32
model on the held-out text shipped with mllm-deploy (`mllm_deploy/data/heldout.txt`).

    accuracy = measure_accuracy(resolved, artifacts)   # BundleAccuracy: both perplexities, what ran
    gate_accuracy(accuracy, resolved)                  # UserError (exit 4) over [accuracy] max_ppl_ratio

The bundle's path is its INT8 graphs with their shadow corrections, its KV cache and prefill
attention, run chunk by chunk (`open_eval_engine`, what `eval` runs). A qnn-htp bundle built on a
machine without a Hexagon NPU is measured on the CPU provider running the QDQ graphs its context
binaries were compiled from (the simulator takes ~100 s a 256-token chunk here, ~25x longer),
and `measured_on` says so: the two agree within 0.0001 in ppl ratio on the default model's
sd8gen3 bundle (`verify`, docs/deploy.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from importlib import resources

from threadpoolctl import threadpool_limits

from mllm_deploy.backends.registry import backend_support
from mllm_deploy.compile.artifacts import Artifacts
from mllm_deploy.compile.bundle_lock import BundleAccuracy
from mllm_deploy.device import load_capabilities
from mllm_deploy.device.models import Capabilities
from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.events import report_progress
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.interface.deployment import EMULATOR
from mllm_deploy.interface.engines import load_deployment_weights, open_eval_engine
from mllm_deploy.model import load_tokenizer
from mllm_deploy.resolve import Resolved
from mllm_deploy.resolve.choices import backend_label
from mllm_deploy.runtime.perplexity import perplexity, token_nll

HELDOUT_TEXT = "heldout.txt"
"""The held-out text (original prose, never used for calibration), in `mllm_deploy/data/`."""
GATE_TOKENS = 512
"""Tokens the gate scores: two 256-token chunks. Measured on the 2-core host (ratio; wall time of
both runs): the default bundle 1.0191 in 2.6 s, against 1.0210 over the whole text (3,620 tokens,
27 s); sd8gen3 0.9952 in 4.1 s, against 1.0022 (43 s). docs/deploy.md has the table."""


def heldout_text() -> str:
    """The held-out text shipped with mllm-deploy."""
    return resources.files("mllm_deploy").joinpath("data", HELDOUT_TEXT).read_text(encoding="utf-8")


def threads_here(resolved: Resolved, host: Capabilities) -> int:
    """CPU threads for measuring on this machine: the profile's, at most the cores it has (a
    Snapdragon profile asks for the phone's 8; more threads than cores only spin)."""
    usable = host.probe.usable_cpus if host.probe is not None else host.cpu_cores
    return max(1, min(resolved.cpu_threads, usable))


def measured_path(resolved: Resolved, host: Capabilities | None = None) -> tuple[Resolved, str]:
    """The resolved profile whose graphs the gate runs here (with this machine's threads), and
    what runs them in words. A backend of context binaries without its NPU on this machine
    (`host`, default: probed) is measured by running the same QDQ graphs on the CPU provider
    (labelled so), never silently."""
    host = host if host is not None else load_capabilities("host")
    threads = threads_here(resolved, host)
    on_device = host.probe is not None and host.probe.qnn_htp_mode == "device"
    if not backend_support(resolved.backend).context_binaries or on_device:
        return replace(resolved, cpu_threads=threads), resolved.backend_label
    emulated = replace(resolved, backend=EMULATOR, cpu_threads=threads, npu_threads=threads)
    units = backend_label(EMULATOR, host)  # this machine's integer units, e.g. "ort-cpu emulation (VNNI INT8)"
    label = units.replace(" emulation (", f" emulation of the {resolved.backend} QDQ graphs (")
    return replace(emulated, backend_label=label), label


def measure_accuracy(resolved: Resolved, artifacts: Artifacts, *, max_tokens: int = GATE_TOKENS) -> BundleAccuracy:
    """Perplexity of the float32 model and of `artifacts`' path on the first `max_tokens` tokens
    of the held-out text (at most `prefill.max_context`; chunks of the profile's `chunk_size`),
    checked against nothing yet."""
    started = time.perf_counter()
    limit = min(max_tokens, resolved.profile.prefill.max_context)
    ids = load_tokenizer(resolved.spec).encode(heldout_text(), allow_special=False)[:limit]
    chunk = resolved.profile.prefill.chunk_size
    path, label = measured_path(resolved)
    with threadpool_limits(limits=path.cpu_threads, user_api="blas"):
        float_engine = FloatEngine(load_deployment_weights(resolved))
        float_ppl = perplexity(
            token_nll(float_engine, ids, chunk, _progress("accuracy gate: float32 (chunks)", ids, chunk))
        )
        engine = open_eval_engine(path, float_engine, artifacts)
        path_ppl = perplexity(
            token_nll(engine, ids, chunk, _progress("accuracy gate: the bundle's path (chunks)", ids, chunk))
        )
    return BundleAccuracy(
        ppl_ratio=path_ppl / float_ppl,
        float_ppl=float_ppl,
        path_ppl=path_ppl,
        tokens=len(ids),
        text=f"mllm_deploy/data/{HELDOUT_TEXT}",
        max_ppl_ratio=resolved.profile.accuracy.max_ppl_ratio,
        measured_on=label,
        chunk_size=chunk,
        seconds=round(time.perf_counter() - started, 2),
    )


def _progress(stage: str, ids: list[int], chunk: int) -> Callable[[int, int], None]:
    """Reports the stage's start now, then each chunk (events.report_progress)."""
    report_progress(stage, 0, -(-len(ids) // chunk))
    return lambda done, total: report_progress(stage, done, total)


def gate_accuracy(accuracy: BundleAccuracy, resolved: Resolved, *, force: bool = False) -> BundleAccuracy:
    """`accuracy` when within `[accuracy] max_ppl_ratio`, or marked `forced` when over it and
    `force`; else UserError (exit 4) naming the key, the limit and the measured ratio."""
    if accuracy.ppl_ratio <= accuracy.max_ppl_ratio:
        return accuracy
    if force:
        return accuracy.model_copy(update={"forced": True})
    raise user_error(
        f"the bundle's path has {accuracy.ppl_ratio:.4f}x the float32 model's perplexity on the held-out "
        f"text ({accuracy.path_ppl:.3f} vs {accuracy.float_ppl:.3f} over {accuracy.tokens} tokens, measured on "
        f"{accuracy.measured_on}), over the limit {accuracy.max_ppl_ratio:g}; no bundle was written",
        **resolved.loaded.where("accuracy.max_ppl_ratio"),
        value=round(accuracy.ppl_ratio, 4),
        allowed=f"<= {accuracy.max_ppl_ratio:g}",
        hint="raise accuracy.max_ppl_ratio, change the quantization or outlier settings, or write it anyway "
        "with build --force-accuracy (the lockfile records that the gate was forced)",
        exit_code=ExitCode.ACCURACY,
    )


def render_accuracy(accuracy: BundleAccuracy) -> str:
    """One line for `build`'s report."""
    forced = "; OVER THE LIMIT, written with --force-accuracy" if accuracy.forced else ""
    return (
        f"accuracy: perplexity {accuracy.path_ppl:.3f} vs float32 {accuracy.float_ppl:.3f} = "
        f"{accuracy.ppl_ratio:.4f}x (limit {accuracy.max_ppl_ratio:g}{forced}); {accuracy.tokens} tokens of "
        f"the held-out text on {accuracy.measured_on}, {accuracy.seconds:.1f} s"
    )
