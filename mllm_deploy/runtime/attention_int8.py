"""Prefill attention over the int8 KV cache in integer matrix products (`prefill.attention = "int8"`).

    attend = Int8ChunkAttention(spec)
    out = attend(q, cache, layer, start, n_real)   # q [T, heads, head_dim] rotated -> [T, heads * head_dim]

The KV cache of the NPU path already holds keys and values as int8 with one calibrated step per
layer, KV head and channel (`KVScales`). Instead of dequantizing a chunk's whole window to
float32 and multiplying in float (what `causal_attention` does), one onnxruntime graph, shared
by every layer, chunk and context length, reads the int8 K/V as they are:

    q' = q * k_step / sqrt(head_dim)              per channel: the key step folded into the query
    q8 = round(q' / s_t) + 128, s_t = max|q'_t| / 127          uint8, one step per token row
    S  = MatMulInteger(q8, K^T) * s_t + mask      [kv_heads, group, T, L]  int32 -> float32
    E  = exp(S - rowmax(S))                       float32 in (0, 1], each row's largest exactly 1
    E8 = round(E * 255)                           uint8 (QuantizeLinear, step 1/255)
    O  = MatMulInteger(E8, V) * v_step / 255 / sum(E)      [kv_heads, group, T, head_dim]

Both products run in onnxruntime's u8 x s8 integer kernels (VNNI/AMX on x86, like the NPU
graphs); softmax stays in float32. What it costs in accuracy is measured with `eval` (README,
Accuracy). Weights below 1/510 of a row's largest round to zero, which is most of the error
(quantizing normalised probabilities instead, whose largest may be 0.01, cost 52% perplexity);
the chunk's own keys are read back from int8 like every earlier one.

The graph has no weights; it is built in memory when the engine opens (a few kB) and runs on
the calling thread (`intra_op_num_threads = 1`): the CPU executor's threads call it side by side.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.runtime.kv_cache import KVCache

OPSET = 21
P_STEPS = 255  # uint8 steps of a probability in [0, 1]
MASK_CACHE_SIZE = 4  # masks [T, L] kept: every layer of a chunk uses the same one


def attention_model(spec: ModelSpec) -> onnx.ModelProto:
    """The int8 chunk-attention graph of `spec`'s head layout (see the module docstring)."""
    heads, kv_heads, dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
    group = heads // kv_heads
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("q", f32, ["T", heads * dim]),  # rotated queries, heads concatenated
        helper.make_tensor_value_info("qk_scale", f32, [heads * dim]),  # key step of each query channel / sqrt(dim)
        helper.make_tensor_value_info("keys_t", TensorProto.INT8, [kv_heads, 1, dim, "L"]),
        helper.make_tensor_value_info("values", TensorProto.INT8, [kv_heads, 1, "L", dim]),
        helper.make_tensor_value_info("mask", f32, ["T", "L"]),  # 0 where a query sees a key, -inf else
        helper.make_tensor_value_info("v_scale", f32, [kv_heads, 1, 1, dim]),  # value step / P_STEPS
    ]
    consts = {
        "inv127": np.float32(1 / 127), "tiny": np.float32(1e-30), "zp128": np.uint8(128), "f128": np.float32(128),
        "last_axis": np.array([-1], np.int64), "flat": np.array([-1], np.int64),
        "q_shape": np.array([0, kv_heads, group, dim], np.int64),
        "p_step": np.float32(1 / P_STEPS), "p_zero": np.uint8(0),
    }  # fmt: skip
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    n = helper.make_node
    nodes = [
        n("Mul", ["q", "qk_scale"], ["q_scaled"]),  # [T, heads*dim]
        n("Abs", ["q_scaled"], ["q_abs"]),
        n("ReduceMax", ["q_abs", "last_axis"], ["q_max"], keepdims=1),  # [T, 1]
        n("Max", ["q_max", "tiny"], ["q_max_pos"]),
        n("Mul", ["q_max_pos", "inv127"], ["q_step"]),  # [T, 1]
        n("Div", ["q_scaled", "q_step"], ["q_steps"]),
        n("Round", ["q_steps"], ["q_round"]),
        n("Add", ["q_round", "f128"], ["q_shift"]),  # [1, 255]: no clip needed
        n("Cast", ["q_shift"], ["q_u8"], to=TensorProto.UINT8),
        n("Reshape", ["q_u8", "q_shape"], ["q_heads"]),  # [T, kv_heads, group, dim]
        n("Transpose", ["q_heads"], ["q8"], perm=[1, 2, 0, 3]),  # [kv_heads, group, T, dim]
        n("Reshape", ["q_step", "flat"], ["row_step"]),  # [T]
        n("MatMulInteger", ["q8", "keys_t", "zp128"], ["scores_i32"]),  # [kv_heads, group, T, L]
        n("DequantizeLinear", ["scores_i32", "row_step"], ["scores"], axis=2),
        n("Add", ["scores", "mask"], ["masked"]),
        n("ReduceMax", ["masked", "last_axis"], ["row_max"], keepdims=1),  # [kv, group, T, 1]
        n("Sub", ["masked", "row_max"], ["shifted"]),
        n("Exp", ["shifted"], ["weights"]),  # (0, 1], the row's largest exactly 1
        n("ReduceSum", ["weights", "last_axis"], ["weight_sum"], keepdims=1),
        n("QuantizeLinear", ["weights", "p_step", "p_zero"], ["weights_u8"]),
        n("MatMulInteger", ["weights_u8", "values"], ["out_i32"]),  # [kv_heads, group, T, dim]
        n("Cast", ["out_i32"], ["out_f32"], to=f32),
        n("Mul", ["out_f32", "v_scale"], ["out_sum"]),
        n("Div", ["out_sum", "weight_sum"], ["out"]),
    ]
    outputs = [helper.make_tensor_value_info("out", f32, [kv_heads, group, "T", dim])]
    graph = helper.make_graph(nodes, "chunk_attention_int8", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mllm-deploy")
    model.ir_version = 10
    return model


class Int8ChunkAttention:
    """Causal attention of a prefill chunk over an int8 KVCache, in onnxruntime integer kernels."""

    def __init__(self, spec: ModelSpec):
        if spec.n_heads % spec.n_kv_heads:
            raise ValueError(f"n_heads {spec.n_heads} is not a multiple of n_kv_heads {spec.n_kv_heads}")
        self.spec = spec
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # runs on the calling CPU executor thread
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # the arena keeps the score buffers ([kv_heads, group, T, L], megabytes) between calls:
        # measured at T = 256, L = 1,024 on one thread, 6.1 ms per call with it, 11.9 ms without
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            attention_model(spec).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self._masks: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._masks_lock = threading.Lock()  # the CPU executor's threads share the masks
        self._steps: dict[int, tuple] = {}  # layer -> (the KVScales they come from, qk_scale, v_scale)

    def _layer_steps(self, cache: KVCache, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(qk_scale [heads*dim], v_scale [kv_heads, 1, 1, dim]) of `layer` for the cache's steps."""
        scales = cache.scales
        held = self._steps.get(layer)
        if held is None or held[0] is not scales:  # computed for other steps (another engine's cache)
            spec = self.spec
            group = spec.n_heads // spec.n_kv_heads
            qk = np.repeat(scales.k[layer], group, axis=0).reshape(-1) / np.float32(np.sqrt(spec.head_dim))
            v = scales.v[layer][:, None, None, :] / np.float32(P_STEPS)
            held = self._steps[layer] = (scales, qk.astype(np.float32), np.ascontiguousarray(v, np.float32))
        return held[1], held[2]

    def _mask(self, n_rows: int, start: int, n_keys: int) -> np.ndarray:
        """[n_rows, n_keys] float32: 0 where key j <= start + row, -inf after (padding rows see every key)."""
        key = (n_rows, start, n_keys)
        with self._masks_lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
                return mask
        future = np.arange(n_keys)[None, :] > (start + np.arange(n_rows))[:, None]
        mask = np.where(future, np.float32(-np.inf), np.float32(0.0)).astype(np.float32)
        with self._masks_lock:
            self._masks[key] = mask
            while len(self._masks) > MASK_CACHE_SIZE:
                self._masks.popitem(last=False)
        return mask

    def __call__(self, q: np.ndarray, cache: KVCache, layer: int, start: int, n_real: int) -> np.ndarray:
        """q [T, heads, head_dim] (rotated; row t at position start + t) against the cache's
        positions 0 .. start + n_real - 1 of `layer`, which must already hold the chunk's own
        K/V. Returns [T, heads * head_dim]."""
        if cache.scales is None:
            raise ValueError("int8 attention needs an int8 KV cache")
        spec = self.spec
        n_rows = q.shape[0]
        end = start + n_real
        keys_t = np.ascontiguousarray(cache.k[layer, :, :end].transpose(0, 2, 1))[:, None]  # [kv, 1, dim, L] int8
        values = np.ascontiguousarray(cache.v[layer, :, :end])[:, None]  # [kv, 1, L, dim] int8
        qk_scale, v_scale = self._layer_steps(cache, layer)
        feeds = {
            "q": np.ascontiguousarray(q.reshape(n_rows, spec.n_heads * spec.head_dim), np.float32),
            "qk_scale": qk_scale, "keys_t": keys_t, "values": values,
            "mask": self._mask(n_rows, start, end), "v_scale": v_scale,
        }  # fmt: skip
        out = self.session.run(["out"], feeds)[0]  # [kv, group, T, dim]
        return out.transpose(2, 0, 1, 3).reshape(n_rows, spec.n_heads * spec.head_dim)
