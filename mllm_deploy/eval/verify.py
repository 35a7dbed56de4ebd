"""`verify_bundle(path) -> [VerifyRow]`: what a bundle's graphs compute on every backend this
machine has, against the float32 model, on real chunks of the held-out text through every layer.

    rows = verify_bundle("dist/sd8gen3", chunks=1, layers=None)
    rows[0].ppl_ratio, rows[0].top1_agreement, rows[0].logit_cosine_min

Backends (one row each):
    ort-cpu   onnxruntime's CPU provider, always: the bundle's QDQ graphs (an ort-cpu bundle), or
              for a qnn-htp bundle, which ships only context binaries, the QDQ graphs they were
              compiled from, found in this machine's build cache (the same build: every file the
              bundle's entry lists has the same sha256 there); else the row says it could not run
    qnn-htp   when onnxruntime-qnn offers the HTP (Qualcomm's x86 simulator, or a Hexagon NPU): a
              qnn-htp bundle's context binaries; an ort-cpu bundle's QDQ graphs are prepared for
              QNN now (HTP v75), and the graphs QNN refuses are listed (CPU fallback is disabled)

Each chunk runs through every layer: the reference is the float32 model (its linears from the
model the bundle was built from: the bundle's own model unless trimmed, else `reference`, else
the built-in model with the lockfile's identity); the bundle's path is its graphs plus shadow
corrections, its KV cache (int8 with the build's scales) and prefill attention, with the bundle's
embedding, norms and head. `layers` restricts which layers run the bundle's graphs (the others run
the float linears), so the slow simulator can cover the model over several runs.

Reported per row: ppl ratio, top-1 agreement and logit cosine (min, mean) over every position;
per layer the residual stream's cosine (min, mean over rows) and max-abs vs float; per graph the
graph's output (with its shadow correction) vs the float linears on the same input; which
provider ran how many nodes, and the graphs QNN refused.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import numpy as np
from threadpoolctl import threadpool_limits

from mllm_deploy.backends.base import BackendError
from mllm_deploy.backends.registry import BACKENDS, NpuBackendName, backend_support, open_backend
from mllm_deploy.compile.artifacts import Artifacts, EntryProblem, artifacts_root, open_entry
from mllm_deploy.compile.bundle_check import OpenedBundle, open_bundle
from mllm_deploy.device import load_capabilities
from mllm_deploy.device.probe import probe_host
from mllm_deploy.errors import user_error
from mllm_deploy.eval.agreement import Agreement, row_cosine, top1_agreement
from mllm_deploy.eval.reference import reference_weights
from mllm_deploy.events import report_progress
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.forward.layers import ChunkSpan, FloatBlockLinears, silu_mul_
from mllm_deploy.interface.accuracy import HELDOUT_TEXT, heldout_text, threads_here
from mllm_deploy.interface.deployment import EMULATOR
from mllm_deploy.interface.engines import load_deployment_weights
from mllm_deploy.model import load_tokenizer
from mllm_deploy.model.linears import GRAPH_KINDS, LINEAR_GROUP
from mllm_deploy.model.spec import LayerWeights
from mllm_deploy.profile import load_profile
from mllm_deploy.resolve import Resolved, resolve_profile
from mllm_deploy.resolve.choices import backend_label
from mllm_deploy.runtime.dag_engine import profile_chunk_attention, profile_kv_scales
from mllm_deploy.runtime.npu_kernels import NpuLayerKernels, load_npu_kernels
from mllm_deploy.runtime.perplexity import rows_nll

SIMULATOR_ARCH = 75  # HTP generation an ort-cpu bundle's graphs are prepared for on QNN
QNN: NpuBackendName = next(name for name, support in BACKENDS.items() if support.context_binaries)
"""The registered backend of QNN context binaries (qnn-htp); the CPU provider's is `EMULATOR`."""


@dataclass
class VerifyRow:
    """One backend's run of the bundle's graphs against float32."""

    backend: str  # a registered backend name: EMULATOR (the CPU provider) or QNN
    runs_on: str  # what really ran the graphs, e.g. "QNN HTP x86 simulator v75 (context binaries)"
    graphs: str  # which graph files ran: "bundle context binaries", "bundle QDQ graphs", ...
    status: str  # "ok", "rejected" (QNN refused graphs), "unavailable" (see note)
    chunks: int
    chunk_size: int
    tokens: int  # positions scored
    layers: list[int]  # layers whose graphs ran on this backend (the rest: float linears)
    text: str  # the text the chunks come from (the held-out text, or the --text file)
    ppl_ratio: float | None = None
    float_ppl: float | None = None
    path_ppl: float | None = None
    top1_agreement: float | None = None
    logit_cosine_min: float | None = None
    logit_cosine_mean: float | None = None
    logit_max_abs: float | None = None
    per_layer: list[dict[str, float]] = field(default_factory=list)  # hidden state after each layer
    per_graph: list[dict[str, object]] = field(default_factory=list)
    assigned_nodes: dict[str, int] = field(default_factory=dict)  # provider -> nodes, over loaded graphs
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"graph", "error"} QNN refused
    seconds: float = 0.0
    note: str = ""


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """`--layers`: None or "all" -> every layer; else comma-separated indexes and ranges ("0-3,29")."""
    if spec is None or spec.strip() == "all":
        return list(range(n_layers))
    chosen: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if not 0 <= first <= last < n_layers:
                raise ValueError(part)
            chosen.update(range(first, last + 1))
    except ValueError:
        raise user_error(f"--layers {spec!r}: give layer indexes and ranges in 0..{n_layers - 1}, e.g. 0-3,29",
                         key="--layers", value=spec, allowed=f"all, or indexes/ranges in 0..{n_layers - 1}") from None  # fmt: skip
    return sorted(chosen)


def bundle_deployment(bundle: OpenedBundle) -> Resolved:
    """The bundle's profile resolved on this machine (a qnn-htp target resolves with a warning)."""
    return resolve_profile(load_profile(bundle.root))


def same_build_qdq_graphs(artifacts: Artifacts) -> Artifacts | None:
    """QDQ graphs of `artifacts`' build: its own, or (a qnn-htp bundle ships only context
    binaries) the build cache entry whose files are the bundle's, byte for byte."""
    if artifacts.graph_path(0, GRAPH_KINDS[0]).is_file():
        return artifacts
    want = {rel: entry for rel, entry in artifacts.manifest.files.items() if not rel.startswith("latencies")}
    root = artifacts_root()
    for entry_dir in sorted(root.iterdir()) if root.is_dir() else ():
        try:
            entry = open_entry(entry_dir, None, verify_checksums=False)
        except EntryProblem:
            continue
        if entry.lock.model_identity != artifacts.lock.model_identity:
            continue
        if all(entry.manifest.files.get(rel) == item for rel, item in want.items()):
            try:  # the graphs about to run: checked against their manifest
                return open_entry(entry_dir, None, verify_checksums=True)
            except EntryProblem:
                return None
    return None


class _ComparedLinears:
    """`BlockLinears` of one layer on the bundle's graphs; each graph's output (with its shadow
    correction) is compared with the float linears on the same input."""

    def __init__(self, kernels: NpuLayerKernels, layer: int, weights: LayerWeights, tally: Agreement):
        self.kernels, self.layer, self.w, self.tally = kernels, layer, weights, tally
        self.rows = kernels.chunk_tokens  # real rows of the current chunk (all: verify runs full chunks)

    def _run(self, kind: str, x: np.ndarray, ref: list[np.ndarray]) -> list[np.ndarray]:
        out = self.kernels.run_linear(self.layer, kind, np.ascontiguousarray(x, np.float32))
        got = np.concatenate([o[: self.rows] for o in out], axis=1)
        self.tally.add((self.layer, kind), got, np.concatenate([r[: self.rows] for r in ref], axis=1))
        return out

    def qkv(self, x_norm):
        q, k, v = self._run("qkv", x_norm, list(FloatBlockLinears(self.w).qkv(x_norm)))
        return q, k, v

    def attn_output(self, attn):
        return self._run("o_proj", attn, [attn @ self.w.wo.T])[0]

    def mlp(self, x_norm):
        gate, up = (x_norm @ w.T for w in LINEAR_GROUP["gate_up"].weight_arrays(self.w))  # type: ignore[attr-defined]
        act = self._run("gate_up", x_norm, [silu_mul_(gate, up)])[0]  # [T, ffn]
        return self._run("down", act, [act @ self.w.w_down.T])[0]  # [T, hidden]


@dataclass(frozen=True)
class _Backend:
    name: str
    view: Resolved  # the bundle's resolved profile with this backend
    artifacts: Artifacts | None  # None: cannot run (see note)
    graphs: str
    note: str = ""
    prepare_on_qnn: bool = False  # an ort-cpu bundle on QNN: only whether QNN takes its graphs


def _backends(bundle: OpenedBundle, resolved: Resolved, artifacts: Artifacts, only: str | None) -> list[_Backend]:
    lock = bundle.lock
    contexts = backend_support(lock.backend).context_binaries
    host = load_capabilities("host")
    cpu = replace(
        resolved, backend=EMULATOR, npu_threads=resolved.cpu_threads, backend_label=backend_label(EMULATOR, host)
    )
    qdq = same_build_qdq_graphs(artifacts)
    found = ("bundle QDQ graphs" if qdq is artifacts else f"QDQ graphs of the same build in this machine's cache ({qdq.root})"
             ) if qdq is not None else "none"  # fmt: skip
    out = [_Backend(EMULATOR, cpu, qdq, found, "" if qdq is not None else
                    "the bundle ships context binaries only and this machine's build cache has not the QDQ graphs "
                    "they were compiled from (verify on the machine that built it)")]  # fmt: skip
    mode = probe_host().qnn_htp_mode
    if mode in ("simulator", "device"):
        if contexts:
            out.append(_Backend(QNN, resolved, artifacts, "bundle context binaries"))
        else:
            label = f"QNN HTP x86 simulator v{SIMULATOR_ARCH}" if mode == "simulator" else f"QNN HTP v{SIMULATOR_ARCH}"
            out.append(_Backend(QNN, replace(resolved, backend_label=label), artifacts,
                                f"bundle QDQ graphs prepared for QNN HTP v{SIMULATOR_ARCH} now", prepare_on_qnn=True,
                                note="an ort-cpu bundle's graphs (no per-output Q/DQ) only prepared on QNN, not run: "
                                "build a qnn-htp bundle to measure what an NPU computes"))  # fmt: skip
    return [b for b in out if only is None or b.name == only]


def _load_kernels(backend: _Backend, layers: list[int], row: VerifyRow) -> NpuLayerKernels | None:
    """The backend's kernels (context binaries or QDQ graphs) with the nodes each provider took;
    None with `row.rejected` filled when QNN refuses graphs."""
    assert backend.artifacts is not None
    if backend.prepare_on_qnn:
        _prepare_on_qnn(backend.artifacts, layers, row)
        return None
    try:
        kernels = load_npu_kernels(backend.view, backend.artifacts, layers)  # only the graphs that run
    except BackendError as exc:
        row.rejected.append({"graph": "*", "error": str(exc).splitlines()[0][:400]})
        return None
    for (layer, _), handle in kernels.handles.items():
        if layer in layers:
            for provider, n in handle.assigned_nodes.items():
                row.assigned_nodes[provider] = row.assigned_nodes.get(provider, 0) + n
    return kernels


def _prepare_on_qnn(artifacts: Artifacts, layers: list[int], row: VerifyRow) -> None:
    """An ort-cpu bundle's QDQ graphs prepared for QNN HTP one by one (CPU fallback disabled):
    what QNN takes, and for each graph it refuses, the nodes it named (from its log)."""
    qnn = open_backend(QNN, htp_arch=SIMULATOR_ARCH)
    for layer in layers:
        for kind in GRAPH_KINDS:
            with _native_stderr() as log:
                try:
                    handle = qnn.load(artifacts.graph_path(layer, kind))
                except BackendError as exc:
                    log.seek(0)
                    marker = "Unsupported nodes in QNN EP:"
                    unsupported = [line.split(marker, 1)[1].strip().removesuffix("\x1b[m")
                                   for line in log.read().splitlines() if marker in line]  # fmt: skip
                    reason = f"unsupported nodes: {unsupported[0]}" if unsupported else str(exc).splitlines()[-1]
                    row.rejected.append({"graph": f"{layer}/{kind}", "error": reason[:400]})
                    continue
            for provider, n in handle.assigned_nodes.items():
                row.assigned_nodes[provider] = row.assigned_nodes.get(provider, 0) + n


@contextlib.contextmanager
def _native_stderr() -> Iterator[IO[str]]:
    """File descriptor 2 (where onnxruntime's native log goes) into a temporary file while the
    block runs; yields the file (seek(0) before reading what was logged)."""
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(log.fileno(), 2)
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _run_backend(backend: _Backend, ctx: _Context, chunks: int, layers: list[int], progress: bool) -> VerifyRow:
    chunk = ctx.resolved.profile.prefill.chunk_size
    row = VerifyRow(backend=backend.name, runs_on=backend.view.backend_label, graphs=backend.graphs,
                    status="ok", chunks=chunks, chunk_size=chunk, tokens=chunks * chunk, layers=layers,
                    text=ctx.text, note=backend.note)  # fmt: skip
    if backend.artifacts is None:
        row.status = "unavailable"
        return row
    started = time.perf_counter()
    kernels = _load_kernels(backend, layers, row)
    if kernels is None:
        row.status = "rejected" if row.rejected else "prepared"
        if row.rejected:
            row.note = (
                f"QNN refused {len(row.rejected)} of {4 * len(layers)} graph(s) (CPU fallback disabled); " + row.note
            )
        row.seconds = round(time.perf_counter() - started, 1)
        return row
    if backend.name == QNN:
        row.runs_on = f"{kernels.backend.describe().get('device_mode', backend.view.backend_label)} ({backend.graphs})"
    graphs, hidden = Agreement(), Agreement()
    ref_w = ctx.reference.weights
    linears = [_ComparedLinears(kernels, i, ref_w.layers[i], graphs) if i in layers else FloatBlockLinears(ref_w.layers[i])
               for i in range(ctx.reference.spec.n_layers)]  # fmt: skip
    kv_scales = profile_kv_scales(ctx.resolved, backend.artifacts)
    path = ctx.path_base.with_linears(linears, profile_chunk_attention(ctx.resolved, kv_scales))
    ref_cache = ctx.reference.new_cache(chunks * chunk)
    path_cache = path.new_cache(chunks * chunk, scales=kv_scales)
    nll_ref, nll_path, cos, top1, max_abs = [], [], [], [], 0.0
    n_layers = ctx.reference.spec.n_layers
    stage = f"verify {backend.name}: {chunks} chunk(s) x {n_layers} layers"
    if progress:
        report_progress(stage, 0, chunks * n_layers)
    for c in range(chunks):
        ids = ctx.ids[c * chunk : (c + 1) * chunk]
        targets = np.asarray(ctx.ids[c * chunk + 1 : (c + 1) * chunk + 1], np.int64)
        span = ChunkSpan(start=c * chunk, n_real=chunk, n_rows=chunk)
        x_ref = ctx.reference.weights.tok_embd[ids]  # [chunk, hidden]
        x_path = path.weights.tok_embd[ids]
        for engine in (ctx.reference, path):
            engine.rope.ensure(span.start + chunk)
        for layer in range(ctx.reference.spec.n_layers):
            x_ref = ctx.reference.block(layer, x_ref, span, ref_cache)
            x_path = path.block(layer, x_path, span, path_cache)
            hidden.add(layer, x_path, x_ref)
            if progress:
                report_progress(stage, c * n_layers + layer + 1, chunks * n_layers)
        ref_cache.advance(list(ids))
        path_cache.advance(list(ids))
        ref_logits, path_logits = ctx.reference.logits(x_ref), path.logits(x_path)  # [chunk, vocab]
        nll_ref.append(rows_nll(ref_logits, targets))
        nll_path.append(rows_nll(path_logits, targets))
        cos.append(row_cosine(path_logits, ref_logits))
        top1.append(top1_agreement(path_logits, ref_logits))
        max_abs = max(max_abs, float(np.abs(path_logits - ref_logits).max()))
    ref_nll, path_nll, all_cos = np.concatenate(nll_ref), np.concatenate(nll_path), np.concatenate(cos)
    row.float_ppl, row.path_ppl = float(np.exp(ref_nll.mean())), float(np.exp(path_nll.mean()))
    row.ppl_ratio = float(np.exp(path_nll.mean() - ref_nll.mean()))
    row.top1_agreement = float(np.concatenate(top1).mean())
    row.logit_cosine_min, row.logit_cosine_mean = float(all_cos.min()), float(all_cos.mean())
    row.logit_max_abs = max_abs
    row.per_layer = [{"layer": int(k), **v} for k, v in hidden.summary().items()]  # type: ignore[call-overload]
    row.per_graph = [{"graph": f"{k[0]}/{k[1]}", **v} for k, v in graphs.summary().items()]  # type: ignore[index]
    row.seconds = round(time.perf_counter() - started, 1)
    return row


@dataclass(frozen=True)
class _Context:
    resolved: Resolved
    reference: FloatEngine  # float32 model, float32 KV cache
    path_base: FloatEngine  # the bundle's model: embedding, norms, head (its linears replaced)
    ids: list[int]
    text: str  # what the ids come from


def verify_bundle(
    path: str | Path,
    *,
    chunks: int = 1,
    layers: str | None = None,
    backend: str | None = None,
    reference: str | None = None,
    text: str | None = None,
    text_name: str | None = None,
    progress: bool = True,
) -> tuple[OpenedBundle, list[VerifyRow]]:
    """Open the bundle at `path` (refusals: `open_bundle`'s, a qnn-htp bundle allowed on the
    simulator) and run its graphs on each backend of this machine (`backend`: only that one) for
    `chunks` chunks of the held-out text (`text`: of this one, called `text_name`); see the module
    docstring. Returns the opened bundle
    (its lockfile, and the warnings opening it gave) and one row per backend."""
    if chunks < 1:
        raise user_error("--chunks must be at least 1", key="--chunks", value=chunks)
    bundle = open_bundle(path, allow_simulator=True)
    if backend is not None and not backend_support(backend).needs_htp_arch:
        # only the CPU provider runs: opening's note that the bundle runs on the simulator does not apply
        bundle = replace(bundle, warnings=tuple(w for w in bundle.warnings if w.key != "target"))
    resolved = bundle_deployment(bundle)
    resolved = replace(resolved, cpu_threads=threads_here(resolved, load_capabilities("host")))  # not a phone's 8
    artifacts = open_entry(bundle.artifacts_dir, None, verify_checksums=False)  # open_bundle checked every file
    chunk = resolved.profile.prefill.chunk_size
    ids = load_tokenizer(resolved.spec).encode(heldout_text() if text is None else text, allow_special=False)
    name = f"mllm_deploy/data/{HELDOUT_TEXT}" if text is None else (text_name or "the text")
    if len(ids) < chunks * chunk + 1:
        raise user_error(f"{name} has {len(ids)} tokens: at most {(len(ids) - 1) // chunk} chunks of {chunk}",
                         key="--chunks", value=chunks, allowed=f"1..{(len(ids) - 1) // chunk}")  # fmt: skip
    chosen = parse_layers(layers, resolved.spec.n_layers)
    with threadpool_limits(limits=max(1, resolved.cpu_threads), user_api="blas"):
        ctx = _Context(resolved, FloatEngine(reference_weights(bundle.root, bundle.lock, reference, command="verify")),
                       FloatEngine(load_deployment_weights(resolved)), list(ids[: chunks * chunk + 1]), name)  # fmt: skip
        rows = [_run_backend(b, ctx, chunks, chosen, progress) for b in _backends(bundle, resolved, artifacts, backend)]
    return bundle, rows
