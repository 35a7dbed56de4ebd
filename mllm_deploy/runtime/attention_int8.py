"""Prefill attention over the int8 KV cache in integer matrix products (`prefill.attention = "int8"`).

    attend = Int8ChunkAttention(spec)
    out = attend(q, cache, layer, start, own_keys, own_values)
    # q [T, heads, head_dim] rotated; own_* [n_real, kv_heads, head_dim] -> [T, heads * head_dim]

The KV cache of the NPU path already holds keys and values as int8 with one calibrated step per
layer, KV head and channel (`KVScales`). Instead of dequantizing a chunk's whole window to
float32 and multiplying in float (what `causal_attention` does), one onnxruntime graph, shared
by every layer, chunk and context length, reads the earlier chunks' int8 K/V as they are, and
attends the chunk's own keys (the nearest, most attended ones) in float32:

    earlier chunks, positions 0 .. start-1 (no mask: every query sees them all)
      q' = q * k_step / sqrt(head_dim)            per channel: the key step folded into the query
      q8 = round(q' / s_t) + 128, s_t = max|q'_t| / 127          uint8, one step per token row
      S  = MatMulInteger(q8, K^T) * s_t           [kv_heads, group, T, start]  int32 -> float32
      E  = exp(S - rowmax(S))                     (0, 1], each row's largest exactly 1
      E8 = round(E * 255)                         uint8 (QuantizeLinear, step 1/255)
      [Σ E8·V8 | Σ E8] = MatMulInteger(E8, [V | 1])   the ones column gives the sum of the
                                                  weights as quantized, so the rounding of
                                                  small weights does not shrink the output
    the chunk's own rows: float32 scores + causal mask, exp(S - rowmax), sum, E·V
    merged: both parts rescaled to the common row max (exp(max_part - max)), numerators and
    weight sums added, then divided

Both products over earlier chunks run in onnxruntime's u8 x s8 integer kernels (VNNI/AMX on
x86, like the NPU graphs); softmax stays in float32. Measured with `eval` on 4,096 tokens of
news (README, Accuracy): +0.4% perplexity over float32 attention, where a first version that
read the chunk's own keys from int8 too and normalised by the float sum cost +2.8% (small
weights round to zero; quantizing normalised probabilities instead, whose largest may be 0.01,
cost 52%). The first chunk has no earlier one and is attended in float32 (`causal_attention`).

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

from mllm_deploy.forward.kv_cache import KVCache
from mllm_deploy.forward.layers import causal_attention
from mllm_deploy.model.spec import ModelSpec

OPSET = 21
P_STEPS = 255  # uint8 steps of a probability in [0, 1]
MASK_CACHE_SIZE = 4  # causal masks [T, n_real] kept (full chunks all use one)


def attention_model(spec: ModelSpec) -> onnx.ModelProto:
    """The chunk-attention graph of `spec`'s head layout (see the module docstring)."""
    heads, kv_heads, dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
    group = heads // kv_heads
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("q", f32, ["T", heads * dim]),  # rotated queries, heads concatenated
        helper.make_tensor_value_info("qk_scale", f32, [heads * dim]),  # key step of each query channel / sqrt(dim)
        helper.make_tensor_value_info("past_keys_t", TensorProto.INT8, [kv_heads, 1, dim, "P"]),
        helper.make_tensor_value_info("past_values", TensorProto.INT8, [kv_heads, 1, "P", dim + 1]),  # last column 1
        helper.make_tensor_value_info("v_scale", f32, [kv_heads, 1, 1, dim]),  # value step / P_STEPS
        helper.make_tensor_value_info("own_keys_t", f32, [kv_heads, 1, dim, "N"]),  # the chunk's real rows
        helper.make_tensor_value_info("own_values", f32, [kv_heads, 1, "N", dim]),
        helper.make_tensor_value_info("mask", f32, ["T", "N"]),  # 0 where a query sees an own key, -inf else
    ]
    consts = {
        "inv127": np.float32(1 / 127), "tiny": np.float32(1e-30), "zp128": np.uint8(128), "f128": np.float32(128),
        "inv_sqrt_dim": np.float32(1 / np.sqrt(dim)), "last_axis": np.array([-1], np.int64),
        "flat": np.array([-1], np.int64), "q_shape": np.array([0, kv_heads, group, dim], np.int64),
        "p_step": np.float32(1 / P_STEPS), "p_zero": np.uint8(0), "split": np.array([dim, 1], np.int64),
    }  # fmt: skip
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    n = helper.make_node
    past = [  # earlier chunks: integer products over the int8 cache
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
        n("MatMulInteger", ["q8", "past_keys_t", "zp128"], ["past_i32"]),  # [kv_heads, group, T, P]
        n("DequantizeLinear", ["past_i32", "row_step"], ["past_scores"], axis=2),
        n("ReduceMax", ["past_scores", "last_axis"], ["past_max"], keepdims=1),  # [kv, group, T, 1]
        n("Sub", ["past_scores", "past_max"], ["past_shifted"]),
        n("Exp", ["past_shifted"], ["past_weights"]),  # (0, 1], the row's largest exactly 1
        n("QuantizeLinear", ["past_weights", "p_step", "p_zero"], ["past_weights_u8"]),
        n("MatMulInteger", ["past_weights_u8", "past_values"], ["past_i32_out"]),  # [kv, group, T, dim + 1]
        n("Cast", ["past_i32_out"], ["past_f32_out"], to=f32),
        n("Split", ["past_f32_out", "split"], ["past_sum_steps", "past_weight_steps"], axis=-1),
        n("Mul", ["past_sum_steps", "v_scale"], ["past_sum"]),  # Σ E·V, E in units of 1
        n("Mul", ["past_weight_steps", "p_step"], ["past_weight_sum"]),  # Σ E of the quantized weights
    ]
    own = [  # the chunk's own keys: float32, causal mask
        n("Mul", ["q", "inv_sqrt_dim"], ["q_own"]),
        n("Reshape", ["q_own", "q_shape"], ["q_own_heads"]),
        n("Transpose", ["q_own_heads"], ["qf"], perm=[1, 2, 0, 3]),  # [kv_heads, group, T, dim]
        n("MatMul", ["qf", "own_keys_t"], ["own_raw"]),  # [kv_heads, group, T, N]
        n("Add", ["own_raw", "mask"], ["own_scores"]),
        n("ReduceMax", ["own_scores", "last_axis"], ["own_max"], keepdims=1),
        n("Sub", ["own_scores", "own_max"], ["own_shifted"]),
        n("Exp", ["own_shifted"], ["own_weights"]),
        n("ReduceSum", ["own_weights", "last_axis"], ["own_weight_sum"], keepdims=1),
        n("MatMul", ["own_weights", "own_values"], ["own_sum"]),  # [kv_heads, group, T, dim]
    ]
    merge = [  # the two parts, each relative to its own row max, brought to the common max
        n("Max", ["past_max", "own_max"], ["row_max"]),
        n("Sub", ["past_max", "row_max"], ["past_gap"]),
        n("Exp", ["past_gap"], ["past_factor"]),  # [kv, group, T, 1]
        n("Sub", ["own_max", "row_max"], ["own_gap"]),
        n("Exp", ["own_gap"], ["own_factor"]),
        n("Mul", ["past_sum", "past_factor"], ["past_part"]),
        n("Mul", ["own_sum", "own_factor"], ["own_part"]),
        n("Add", ["past_part", "own_part"], ["numerator"]),
        n("Mul", ["past_weight_sum", "past_factor"], ["past_mass"]),
        n("Mul", ["own_weight_sum", "own_factor"], ["own_mass"]),
        n("Add", ["past_mass", "own_mass"], ["denominator"]),
        n("Div", ["numerator", "denominator"], ["out"]),
    ]
    outputs = [helper.make_tensor_value_info("out", f32, [kv_heads, group, "T", dim])]
    graph = helper.make_graph(past + own + merge, "chunk_attention_int8", inputs, outputs, inits)
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
        self._masks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._masks_lock = threading.Lock()  # the CPU executor's threads share the masks
        self._steps: dict[int, tuple] = {}  # layer -> (the KVScales they come from, qk_scale, v_scale)

    def _layer_steps(self, cache: KVCache, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(qk_scale [heads*dim], v_scale [kv_heads, 1, 1, dim]) of `layer` for the cache's steps."""
        scales = cache.scales
        assert scales is not None  # int8 attention reads only int8 caches (attend_stored_chunk checks)
        held = self._steps.get(layer)
        if held is None or held[0] is not scales:  # computed for other steps (another engine's cache)
            spec = self.spec
            group = spec.n_heads // spec.n_kv_heads
            qk = np.repeat(scales.k[layer], group, axis=0).reshape(-1) / np.float32(np.sqrt(spec.head_dim))
            v = scales.v[layer][:, None, None, :] / np.float32(P_STEPS)
            held = self._steps[layer] = (scales, qk.astype(np.float32), np.ascontiguousarray(v, np.float32))
        return held[1], held[2]

    def _mask(self, n_rows: int, n_keys: int) -> np.ndarray:
        """[n_rows, n_keys] float32 over the chunk's own keys: 0 where key j <= row, -inf after
        (padding rows see every key)."""
        key = (n_rows, n_keys)
        with self._masks_lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
                return mask
        future = np.arange(n_keys)[None, :] > np.arange(n_rows)[:, None]
        mask = np.where(future, np.float32(-np.inf), np.float32(0.0)).astype(np.float32)
        with self._masks_lock:
            self._masks[key] = mask
            while len(self._masks) > MASK_CACHE_SIZE:
                self._masks.popitem(last=False)
        return mask

    def __call__(self, q: np.ndarray, cache: KVCache, layer: int, start: int, own_keys: np.ndarray,
                 own_values: np.ndarray) -> np.ndarray:  # fmt: skip
        """q [T, heads, head_dim] (rotated; row t at position start + t) against the cache's
        positions 0 .. start - 1 of `layer` and the chunk's own real K/V rows `own_keys`,
        `own_values` [n_real, kv_heads, head_dim] (rotated). Returns [T, heads * head_dim]."""
        if cache.scales is None:
            raise ValueError("int8 attention needs an int8 KV cache")
        spec = self.spec
        n_rows, n_real = q.shape[0], own_keys.shape[0]
        if start == 0:  # no earlier chunk: the chunk's own keys alone, in float32
            return causal_attention(q, own_keys.transpose(1, 0, 2), own_values.transpose(1, 0, 2), 0, spec.n_kv_heads)
        keys_t = np.ascontiguousarray(cache.k[layer, :, :start].transpose(0, 2, 1))[:, None]  # [kv, 1, dim, P] int8
        values = np.ones((spec.n_kv_heads, 1, start, spec.head_dim + 1), np.int8)  # [kv, 1, P, dim + 1]
        values[:, 0, :, : spec.head_dim] = cache.v[layer, :, :start]
        qk_scale, v_scale = self._layer_steps(cache, layer)
        feeds = {
            "q": np.ascontiguousarray(q.reshape(n_rows, spec.n_heads * spec.head_dim), np.float32),
            "qk_scale": qk_scale, "past_keys_t": keys_t, "past_values": values, "v_scale": v_scale,
            "own_keys_t": np.ascontiguousarray(own_keys.transpose(1, 2, 0), np.float32)[:, None],
            "own_values": np.ascontiguousarray(own_values.transpose(1, 0, 2), np.float32)[:, None],
            "mask": self._mask(n_rows, n_real),
        }  # fmt: skip
        out = self.session.run(["out"], feeds)[0]  # [kv, group, T, dim]
        return out.transpose(2, 0, 1, 3).reshape(n_rows, spec.n_heads * spec.head_dim)
