"""CPU decode with INT8 weights: onnxruntime MatMulNBits (8-bit, blocks of 32) + numpy attention.

Decode is memory-bound: every token reads every weight once. float32 weights are 4 bytes per
parameter; 8-bit blocks are ~1.1, and onnxruntime's MatMulNBits with `accuracy_level = 4`
quantizes the activation row per block of 32 and runs integer dot products (the same scheme as
llama.cpp's Q8_0). Measured on this host (one 1536x576 matvec, 1 thread): float32 numpy 213 us,
MatMulNBits 8-bit acc-level 4 34 us, acc-level 0/1 (float compute) ~1.6-2.1 ms.

One token is `n_layers + 2` onnxruntime runs; attention (dynamic length) stays in numpy between
them, reading the shared float32 KV cache in place:

    seg 0        x = embedding row -> attn_norm_0 -> qkv_0                     -> qkv [1, q+2kv]
    seg l (1..)  (resid, attn_{l-1}) -> o_proj, +resid, ffn_norm, gate/up, silu*up, down, +resid,
                 attn_norm_l -> qkv_l                                           -> resid', qkv
    seg n        (resid, attn_{n-1}) -> ... -> final norm                       -> x_final [1, hidden]
    head         x_final -> output projection                                   -> logits [1, vocab]

Graphs are built once from the float weights and cached on disk (`cache_dir()/decode/<key>/`),
so a warm start reads only the INT8 graphs and never touches the float32 linear weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mllm_deploy.model.spec import LlamaWeights, ModelSpec
from mllm_deploy.paths import cache_dir
from mllm_deploy.runtime.file_rows import FileRows
from mllm_deploy.runtime.kv_cache import KVCache
from mllm_deploy.runtime.layers import causal_attention
from mllm_deploy.runtime.rope import RopeTables

FORMAT_VERSION = 1
BLOCK = 32
OPSET = 21
MS_DOMAIN = "com.microsoft"


def quantize_blocks_u8(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """w float32 [N, K] -> (q uint8 [N, ceil(K/block), block] with zero point 128, scale float32
    [N, ceil(K/block)]). Symmetric per block: scale = max|w| / 127, q = round(w / scale) + 128
    in [1, 255]; a last partial block is padded with zeros (as MatMulNBits expects)."""
    n, k = w.shape
    w = np.asarray(w, np.float32)
    if k % block:
        w = np.concatenate([w, np.zeros((n, block - k % block), np.float32)], axis=1)
    blocks = w.reshape(n, -1, block)
    scale = np.abs(blocks).max(axis=-1) / np.float32(127.0)  # [N, K/block]
    scale = np.where(scale > 0, scale, np.float32(1e-12)).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8), scale


def dequantize_blocks_u8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    n, kb, block = q.shape
    return ((q.astype(np.float32) - 128.0) * scale[..., None]).reshape(n, kb * block)


class _Builder:
    """Nodes and initializers of one segment graph."""

    def __init__(self, name: str):
        self.name, self.nodes, self.inits, self._n = name, [], [], 0

    def tmp(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, stem: str, value: np.ndarray) -> str:
        name = self.tmp(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str, domain: str = "", **attrs) -> str:
        out = self.tmp(stem)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def rms_norm(self, x: str, weight: np.ndarray, eps: float) -> str:
        """x * weight / sqrt(mean(x^2) + eps) (the pattern onnxruntime fuses into SimplifiedLayerNorm)."""
        sq = self.op("Pow", [x, self.const("two", np.array(2.0, np.float32))], "sq")
        mean = self.op("ReduceMean", [sq, self.const("axes", np.array([-1], np.int64))], "mean", keepdims=1)
        var = self.op("Add", [mean, self.const("eps", np.array(eps, np.float32))], "var")
        norm = self.op("Div", [x, self.op("Sqrt", [var], "std")], "normed")
        return self.op("Mul", [norm, self.const("norm_w", np.asarray(weight, np.float32))], "rms")

    def linear(self, x: str, weights: list[np.ndarray], biases: list[np.ndarray | None] | None = None) -> str:
        """x [1, K] @ concat(weights).T (+ concat(biases)) with 8-bit block weights."""
        w = np.concatenate([np.asarray(a, np.float32) for a in weights], axis=0)  # [N, K]
        n, k = w.shape
        q, scale = quantize_blocks_u8(w)
        y = self.op(
            "MatMulNBits", [x, self.const("wq", q), self.const("ws", scale.reshape(-1))], "mm",
            domain=MS_DOMAIN, K=k, N=n, bits=8, block_size=BLOCK, accuracy_level=4,
        )  # fmt: skip
        if biases and any(b is not None for b in biases):
            full = np.concatenate([b if b is not None else np.zeros(a.shape[0], np.float32) for a, b in zip(weights, biases)])
            y = self.op("Add", [y, self.const("bias", full.astype(np.float32))], "biased")
        return y

    def model(self, inputs: dict[str, int], outputs: dict[str, tuple[str, int]]) -> onnx.ModelProto:
        """inputs: name -> width; outputs: graph name -> (internal tensor, width)."""
        for out_name, (tensor, _) in outputs.items():
            self.nodes.append(helper.make_node("Identity", [tensor], [out_name], name=f"out_{out_name}"))
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, w]) for n, w in inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, w]) for n, (_, w) in outputs.items()],
            self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)], producer_name="mllm-deploy"
        )
        model.ir_version = 10
        return model


def _mlp_then(b: _Builder, weights: LlamaWeights, layer: int, resid: str, attn: str) -> str:
    """Residual stream after layer `layer`'s o_proj and MLP; returns its tensor name."""
    w, spec = weights.layers[layer], weights.spec
    h = b.op("Add", [resid, b.linear(attn, [w.wo])], "h")
    x = b.rms_norm(h, w.ffn_norm, spec.rms_eps)
    gate_up = b.linear(x, [w.w_gate, w.w_up])  # [1, 2 ffn]
    gate = b.op("Slice", [gate_up, b.const("s0", np.array([0])), b.const("s1", np.array([spec.ffn])), b.const("ax", np.array([1]))], "gate")
    up = b.op("Slice", [gate_up, b.const("s0", np.array([spec.ffn])), b.const("s1", np.array([2 * spec.ffn])), b.const("ax", np.array([1]))], "up")
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate], "sig")], "silu"), up], "act")
    return b.op("Add", [h, b.linear(act, [w.w_down])], "resid")


def build_decode_models(weights: LlamaWeights) -> dict[str, onnx.ModelProto]:
    """`seg0 .. seg{n}` and `head` (see the module docstring)."""
    spec = weights.spec
    n, hidden, qkv_width = spec.n_layers, spec.hidden, spec.q_dim + 2 * spec.kv_dim
    models = {}
    for seg in range(n + 1):
        b = _Builder(f"decode_seg{seg}")
        if seg == 0:
            resid = "x"
            inputs = {"x": hidden}
        else:
            resid = _mlp_then(b, weights, seg - 1, "resid_in", "attn")
            inputs = {"resid_in": hidden, "attn": spec.q_dim}
        if seg < n:
            w = weights.layers[seg]
            x = b.rms_norm(resid, w.attn_norm, spec.rms_eps)
            qkv = b.linear(x, [w.wq, w.wk, w.wv], [w.bq, w.bk, w.bv])
            outputs = {"qkv": (qkv, qkv_width)}
            if seg > 0:
                outputs["resid"] = (resid, hidden)
        else:
            outputs = {"x_final": (b.rms_norm(resid, weights.output_norm, spec.rms_eps), hidden)}
        models[f"seg{seg}"] = b.model(inputs, outputs)
    head = _Builder("decode_head")
    models["head"] = head.model({"x_final": hidden}, {"logits": (head.linear("x_final", [weights.output]), spec.vocab)})
    return models


def decode_cache_key(spec: ModelSpec) -> str:
    if spec.file_sha256:
        identity = ["sha256", spec.file_sha256]
    else:
        st = Path(spec.path).stat()
        identity = ["file", str(Path(spec.path).resolve()), st.st_size, st.st_mtime_ns]
    identity += ["decode-int8", FORMAT_VERSION, BLOCK, onnx.__version__]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def cached_decode_graphs(spec: ModelSpec, weights_loader) -> Path:
    """Directory holding the decode graphs of `spec`; built (reading the float weights from
    `weights_loader()`) and written atomically the first time."""
    root = cache_dir() / "decode"
    final = root / decode_cache_key(spec)
    names = [f"seg{i}" for i in range(spec.n_layers + 1)] + ["head"]
    if (final / "manifest.json").is_file() and all((final / f"{n}.onnx").is_file() for n in names):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".decode-", dir=root))
    try:
        for name, model in build_decode_models(weights_loader()).items():
            onnx.save_model(model, tmp / f"{name}.onnx")
        (tmp / "manifest.json").write_text(json.dumps({"format": FORMAT_VERSION, "graphs": names, "model": spec.path}))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class Int8Decoder:
    """Decode steps over a KVCache with the segment graphs; `decode_step` mirrors FloatEngine's."""

    name = "cpu-int8-ort-matmulnbits"

    def __init__(self, spec: ModelSpec, tok_embd: np.ndarray, rope: RopeTables, graphs: Path | dict, threads: int):
        self.spec = spec
        self.tok_embd = tok_embd if isinstance(tok_embd, FileRows) else FileRows(tok_embd)  # [vocab, hidden]
        self.rope = rope
        self.threads = threads
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No per-session arena or memory pattern: with 32 sessions, arenas that keep each one's
        # largest buffers cost far more RSS than the malloc calls they save on [1, width] tensors.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        names = [f"seg{i}" for i in range(spec.n_layers + 1)] + ["head"]
        sources = {n: (graphs[n].SerializeToString() if isinstance(graphs, dict) else str(Path(graphs) / f"{n}.onnx")) for n in names}
        self.sessions = {n: ort.InferenceSession(src, options, providers=["CPUExecutionProvider"]) for n, src in sources.items()}
        self._segs = [self.sessions[f"seg{i}"] for i in range(spec.n_layers + 1)]

    def lm_head(self, x_final: np.ndarray) -> np.ndarray:
        """x_final [1, hidden] (already normed) -> logits [1, vocab]."""
        return self.sessions["head"].run(["logits"], {"x_final": np.ascontiguousarray(x_final, np.float32)})[0]

    def decode_step(self, cache: KVCache, token_id: int) -> np.ndarray:
        """Append one token at position `cache.length`; return next-token logits [vocab]."""
        spec = self.spec
        pos = cache.length
        if pos >= cache.capacity:
            raise ValueError("KV cache full")
        self.rope.ensure(pos + 1)
        q_dim, kv_dim = spec.q_dim, spec.kv_dim
        x = np.ascontiguousarray(self.tok_embd[int(token_id)][None, :], np.float32)  # [1, hidden]
        (qkv,) = self._segs[0].run(["qkv"], {"x": x})
        resid = x
        for layer in range(spec.n_layers):
            q = self.rope.apply(qkv[:, :q_dim].reshape(1, spec.n_heads, spec.head_dim), pos)
            k = self.rope.apply(qkv[:, q_dim : q_dim + kv_dim].reshape(1, spec.n_kv_heads, spec.head_dim), pos)
            cache.k[layer, pos] = k[0]
            cache.v[layer, pos] = qkv[0, q_dim + kv_dim :].reshape(spec.n_kv_heads, spec.head_dim)
            attn = causal_attention(q, cache.k[layer, : pos + 1], cache.v[layer, : pos + 1], pos, spec.n_kv_heads)  # [1, q_dim]
            feeds = {"resid_in": resid, "attn": attn}
            if layer + 1 < spec.n_layers:
                qkv, resid = self._segs[layer + 1].run(["qkv", "resid"], feeds)
            else:
                (x_final,) = self._segs[layer + 1].run(["x_final"], feeds)
        cache.advance([int(token_id)])
        return self.lm_head(x_final)[0]
