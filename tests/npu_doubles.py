"""Test doubles of `NpuLayerKernels` (the issue-4 interface), for tests only.

- `FloatKernels`: the float32 numpy graphs of `backends.numpy_float` (exact reference). With
  `shadow_clamp`, linear inputs are clamped to ±clamp on the "NPU" side and the CPU shadow adds
  (x - clamp(x)) @ W.T, an exact linear split (gate_up is not shadowed: silu·mul is not linear).
- `OrtInt8Kernels`: real onnxruntime INT8 QDQ graphs from `compile.graphs` with max-abs grids
  measured on sample activations, run on the CPU provider with `npu_threads` threads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from float_graphs import float_layer_graphs

from mllm_deploy.backends.ort_cpu import OrtCpuBackend
from mllm_deploy.compile.graphs import (
    build_layer_models,
    max_abs_layer_act_quant,
    quantize_layer_weights,
    save_model_atomic,
)
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.forward.layers import rms_norm

KINDS = ("qkv", "o_proj", "gate_up", "down")


class FloatKernels:
    backend_label = "numpy float32 (test double)"
    tail_chunk_tokens = 0  # no tail graphs

    def __init__(self, weights, chunk_tokens: int, shadow_clamp: float | None = None, shadow_layers=()):
        self.chunk_tokens = chunk_tokens
        self.graphs = [float_layer_graphs(layer, i, chunk_tokens) for i, layer in enumerate(weights.layers)]
        self.clamp = shadow_clamp
        self.shadowed = frozenset((layer, kind) for layer in shadow_layers for kind in KINDS)
        self.calls: list[tuple[int, str]] = []

    def run_graph(self, layer: int, kind: str, x: np.ndarray) -> list[np.ndarray]:
        assert x.shape[0] == self.chunk_tokens and x.dtype == np.float32
        self.calls.append((layer, kind))
        graph = self.graphs[layer][kind]
        if (layer, kind) in self.shadowed:
            x = np.clip(x, -self.clamp, self.clamp)
            if kind == "gate_up":
                return [x @ w.T for w in graph.weights]  # [gate, up] pre-activations
        out = graph.apply(x)
        return [out[name] for name in graph.output_names]

    def shadow(self, layer: int, kind: str, x: np.ndarray) -> list[np.ndarray] | None:
        if (layer, kind) not in self.shadowed:
            return None
        graph = self.graphs[layer][kind]
        outlier = x - np.clip(x, -self.clamp, self.clamp)  # [chunk, in], zero except outliers
        return [outlier @ w.T for w in graph.weights]  # biases are on the NPU side

    def combine(self, layer: int, kind: str, npu: list[np.ndarray], correction) -> list[np.ndarray]:
        if correction is None:
            return npu
        fixed = [a + c for a, c in zip(npu, correction, strict=False)]
        if kind == "gate_up":
            gate, up = fixed
            return [gate / (1.0 + np.exp(-gate)) * up]
        return fixed

    def stats(self) -> dict:
        return {"calls": len(self.calls)}

    def latencies_ms(self) -> dict:
        return {}


class OrtInt8Kernels:
    tail_chunk_tokens = 0  # no tail graphs
    backend_label = "ort-cpu INT8 (test double)"

    def __init__(self, weights, chunk_tokens: int, sample_ids: list[int], npu_threads: int = 1, act: str = "uint8"):
        self.chunk_tokens = chunk_tokens
        self.shadowed = frozenset()
        samples = _layer_samples(weights, sample_ids)
        backend = OrtCpuBackend(npu_threads=npu_threads)
        self._dir = tempfile.TemporaryDirectory(prefix="int8-double-")
        self.handles = []
        for i, layer in enumerate(weights.layers):
            grids = max_abs_layer_act_quant(layer, *samples[i], act)
            models = build_layer_models(layer, i, chunk_tokens, grids, quantize_layer_weights(layer, "per-channel"))
            paths = {k: save_model_atomic(m, Path(self._dir.name) / f"l{i}_{k}.onnx") for k, m in models.items()}
            self.handles.append({k: backend.load(p) for k, p in paths.items()})
        self.backend = backend

    def run_graph(self, layer: int, kind: str, x: np.ndarray) -> list[np.ndarray]:
        handle = self.handles[layer][kind]
        (name,) = handle.inputs
        out = self.backend.run(handle, {name: x})
        return [out[n] for n in handle.outputs]

    def shadow(self, layer, kind, x):
        return None

    def stats(self) -> dict:
        return {}

    def latencies_ms(self) -> dict:
        return {}


def _layer_samples(weights, ids: list[int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(attn_in, attn_out, mlp_in) of every layer for a float forward of `ids`."""
    engine = FloatEngine(weights)
    cache = engine.new_cache(len(ids) + 1)
    samples = []
    x = weights.tok_embd[np.asarray(ids)]
    from mllm_deploy.forward.layers import ChunkSpan

    span = ChunkSpan(0, len(ids), len(ids))
    for i, layer in enumerate(weights.layers):
        attn_in = rms_norm(x, layer.attn_norm, weights.spec.rms_eps)
        q, k, v = engine.qkv_step(i, x)
        attn = engine.attention_step(i, q, k, v, span, cache)
        h = x + attn @ layer.wo.T
        mlp_in = rms_norm(h, layer.ffn_norm, weights.spec.rms_eps)
        samples.append((attn_in, attn, mlp_in))
        x = engine.out_mlp_step(i, x, attn)
    return samples
