"""The decode graphs: one step over every layer, and the output head, built from float weights.

Every decode token reads every weight once. float32 weights are 4 bytes per parameter; 8-bit
blocks are ~1.1, and onnxruntime's MatMulNBits with `accuracy_level = 4`
quantizes the activation row per block and runs integer dot products (llama.cpp's Q8_0 scheme,
there with blocks of 32). Measured on an earlier host (one 1536x576 matvec, 1 thread): float32
numpy 213 us, MatMulNBits 8-bit acc-level 4 34 us, acc-level 0/1 (float compute) ~1.6-2.1 ms.

Blocks are `decode.weight_block` values, 64 by default: one 512-bit register of int8, and a
divisor of every width of the default model (576, 1536). Measured on the Zen 4 host (2 threads,
1,024 tokens of context, one run alternating the forms 8 tokens at a time): 12.85 ms per token
with blocks of 32, 11.72 with 64, 11.09 with 128. Teacher-forced decode perplexity on 2 x 511
news tokens after 1,024-token prompts: float32 22.492, blocks of 32 22.463, 64 22.498, 128
22.676 (+0.8%); mean KL divergence from float32 per token on 3 x 383 news tokens 0.0031,
0.0055, 0.0087 (top-1 agreement 96.3%, 95.3%, 93.0%; `scripts/decode_accuracy.py`). 64 is the
fastest block whose cost stays within perplexity noise.

`decode.weight_bits = 4` builds the layers' linears in 4-bit blocks (`quantize_blocks_u4`: each
block's minimum kept as a float offset, so blocks of 32 read a GGUF's Q4_1 weights back exactly;
the head stays 8-bit, `head_bits`): the default model's graphs 143 -> 112 MB at blocks of 32,
mean KL from float32 0.0027 (top-1 96.5%), but ~15% slower per token on the Zen 4 host.

The head is 8-bit blocks of `HEAD_BLOCK` = 32 values whatever `decode.weight_block` says:
llama.cpp's Q8_0 block, so a GGUF's Q8_0 tied embedding comes back exactly (scale = the block's
d, code = q + 128; checked on the default model: every row bit for bit) and a bundle keeps one
copy of it, the head's (`compile.decode_weights`).

Every linear's initializers are named `<where>.wq` (codes), `.ws` (scales), `.wo` (4-bit block
offsets), `<where>` being `L{layer}.{kind}` or `head`, so the weights can be found in the saved
graphs (`compile.decode_weights`).

A token is two onnxruntime runs:

    step   x (embedding row) -> for every layer: attn_norm, qkv (MatMulNBits), GroupQueryAttention
           (RoPE inside, the new K/V written into the KV cache in place), o_proj, +resid,
           ffn_norm, gate/up, silu*up, down, +resid -> final norm                -> x_final
           (each residual add is one kernel with the norm after it)
    head   x_final -> output projection                                           -> logits

The step graph comes in two forms, `step` over a float32 KV cache and `step_kv8` over an int8 one
(GroupQueryAttention's PER_CHANNEL int8 cache, the cache's steps bound as inputs).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mllm_deploy.model.spec import LlamaWeights
from mllm_deploy.profile.models import DecodeSection
from mllm_deploy.resolve.memory import HEAD_BLOCK

BLOCK: int = DecodeSection.model_fields["weight_block"].default
"""Values per block unless a caller says otherwise: the profile's `decode.weight_block` default."""
BITS: int = DecodeSection.model_fields["weight_bits"].default
"""Bits per weight unless a caller says otherwise: the profile's `decode.weight_bits` default."""
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
    w: np.ndarray = ((q.astype(np.float32) - 128.0) * scale[..., None]).reshape(n, kb * block)
    return w


def quantize_blocks_u4(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w float32 [N, K] -> (q uint8 [N, ceil(K/block), block/2], scale float32 [N, ceil(K/block)],
    offset float32 [N, ceil(K/block)]): per block min/max, scale = (max - min) / 15, code
    round((w - min) / scale) in 0..15, two per byte with the first in the low nibble (a last
    partial block padded with zeros). MatMulNBits reads (code - 8) * scale (its default zero point
    for 4 bits); `offset` = min + 8 * scale is the rest of every value of the block, added by
    `_Builder.linear` as block sums of the input times the offsets. The block minimum needs not
    sit on the grid as an integer zero point would force it to: a GGUF's Q4_1 block (min + d * q,
    block 32) comes back exactly from its float weights."""
    n, k = w.shape
    w = np.asarray(w, np.float32)
    if k % block:
        w = np.concatenate([w, np.zeros((n, block - k % block), np.float32)], axis=1)
    blocks = w.reshape(n, -1, block)
    low = blocks.min(axis=-1)
    scale = ((blocks.max(axis=-1) - low) / np.float32(15.0)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1e-12)).astype(np.float32)
    codes = np.clip(np.rint((blocks - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    q = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return q, scale, (low + np.float32(8.0) * scale).astype(np.float32)


def dequantize_blocks_u4(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The float32 [N, ceil(K/block) * block] weights `quantize_blocks_u4`'s output stands for."""
    n, kb, half = q.shape
    codes = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(n, kb, 2 * half).astype(np.float32)
    w: np.ndarray = ((codes - 8.0) * scale[..., None] + offset[..., None]).reshape(n, kb * 2 * half)
    return w


class _Builder:
    """Nodes and initializers of one segment graph."""

    def __init__(self, name: str, block: int = BLOCK, bits: int = BITS):
        self.name, self._n, self.block, self.bits = name, 0, block, bits
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def tmp(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, stem: str, value: np.ndarray, name: str | None = None) -> str:
        name = name or self.tmp(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str, domain: str = "", **attrs: int | float | str) -> str:
        out = self.tmp(stem)
        node = helper.make_node(op_type, inputs, [out], name=out, domain=domain)
        # the attributes as make_node(**attrs) would add them (sorted by name), without letting an
        # attribute named like one of make_node's own parameters (doc_string, overload) bind to it
        node.attribute.extend(helper.make_attribute(key, value) for key, value in sorted(attrs.items()))
        self.nodes.append(node)
        return out

    def rms_norm(self, x: str, weight: np.ndarray, eps: float) -> str:
        """x * weight / sqrt(mean(x^2) + eps) (the pattern onnxruntime fuses into SimplifiedLayerNorm)."""
        sq = self.op("Pow", [x, self.const("two", np.array(2.0, np.float32))], "sq")
        mean = self.op("ReduceMean", [sq, self.const("axes", np.array([-1], np.int64))], "mean", keepdims=1)
        var = self.op("Add", [mean, self.const("eps", np.array(eps, np.float32))], "var")
        norm = self.op("Div", [x, self.op("Sqrt", [var], "std")], "normed")
        return self.op("Mul", [norm, self.const("norm_w", np.asarray(weight, np.float32))], "rms")

    def add_rms_norm(self, x: str, skip: str, weight: np.ndarray, eps: float) -> tuple[str, str]:
        """(rms_norm(x + skip), x + skip) in one kernel (onnxruntime's SkipSimplifiedLayerNormalization)."""
        normed, total = self.tmp("rms"), self.tmp("sum")
        self.nodes.append(helper.make_node(
            "SkipSimplifiedLayerNormalization", [x, skip, self.const("norm_w", np.asarray(weight, np.float32))],
            [normed, "", "", total], name=normed, domain=MS_DOMAIN, epsilon=float(eps),
        ))  # fmt: skip
        return normed, total

    def linear(
        self, x: str, weights: list[np.ndarray], biases: list[np.ndarray | None] | None = None, *, where: str = ""
    ) -> str:
        """x [1, K] @ concat(weights).T (+ concat(biases)) with block weights of `self.bits`: 8-bit
        symmetric (zero point 128, implicit), or 4-bit codes around MatMulNBits' default zero
        point with each block's offset added from the input's block sums (`quantize_blocks_u4`).
        Not MatMulNBits' own zero points: integer ones force 0 onto the block's grid (re-quantizing
        the default model's Q4_1 weights that way measured mean KL 0.27 from float, top-1 66%),
        float ones take it off its integer kernel (56x slower on one 576x1536 matvec). `where` names
        the weights (`<where>.wq`, `.ws`, `.wo`; empty: numbered names)."""
        w = np.concatenate([np.asarray(a, np.float32) for a in weights], axis=0)  # [N, K]
        n, k = w.shape
        offset = None
        if self.bits == 4:
            q, scale, offset = quantize_blocks_u4(w, self.block)
        else:
            q, scale = quantize_blocks_u8(w, self.block)
        y = self.op(
            "MatMulNBits", [x, self.const("wq", q, where and f"{where}.wq"), self.const("ws", scale.reshape(-1), where and f"{where}.ws")], "mm",
            domain=MS_DOMAIN, K=k, N=n, bits=self.bits, block_size=self.block, accuracy_level=4,
        )  # fmt: skip
        if offset is not None:  # + (x's block sums) @ offset.T, in float32
            kb = offset.shape[1]
            flat = self.op("Reshape", [x, self.const("flat", np.array([k], np.int64))], "flat")
            if k % self.block:
                pads = np.array([0, kb * self.block - k], np.int64)
                flat = self.op("Pad", [flat, self.const("pads", pads)], "padded")
            rows = self.op("Reshape", [flat, self.const("rows", np.array([kb, self.block], np.int64))], "rows")
            sums = self.op("ReduceSum", [rows, self.const("axes", np.array([-1], np.int64))], "sums", keepdims=0)
            shift = self.op(
                "MatMul", [sums, self.const("wo", np.ascontiguousarray(offset.T), where and f"{where}.wo")], "shift"
            )
            y = self.op("Add", [y, shift], "offset")
        if biases and any(b is not None for b in biases):
            full = np.concatenate(
                [b if b is not None else np.zeros(a.shape[0], np.float32) for a, b in zip(weights, biases, strict=True)]
            )
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
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="mllm-deploy",
        )
        model.ir_version = 10
        return model


def _mlp_then(
    b: _Builder, weights: LlamaWeights, layer: int, resid: str, attn: str, next_norm: np.ndarray
) -> tuple[str, str]:
    """(rms_norm(r, next_norm), r) for r the residual stream after layer `layer`'s o_proj and MLP;
    each residual add is fused with the norm that follows it."""
    w, spec = weights.layers[layer], weights.spec
    x, h = b.add_rms_norm(b.linear(attn, [w.wo], where=f"L{layer}.o_proj"), resid, w.ffn_norm, spec.rms_eps)
    gate_up = b.linear(x, [w.w_gate, w.w_up], where=f"L{layer}.gate_up")  # [1, 1, 2 ffn]
    gate = b.op(
        "Slice",
        [gate_up, b.const("s0", np.array([0])), b.const("s1", np.array([spec.ffn])), b.const("ax", np.array([-1]))],
        "gate",
    )
    up = b.op(
        "Slice",
        [
            gate_up,
            b.const("s0", np.array([spec.ffn])),
            b.const("s1", np.array([2 * spec.ffn])),
            b.const("ax", np.array([-1])),
        ],
        "up",
    )
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate], "sig")], "silu"), up], "act")
    return b.add_rms_norm(b.linear(act, [w.w_down], where=f"L{layer}.down"), h, next_norm, spec.rms_eps)


def kv_names(layer: int) -> tuple[str, str, str, str]:
    """(past_key, past_value, present_key, present_value) input/output names of `layer`."""
    return f"past_key_{layer}", f"past_value_{layer}", f"present_key_{layer}", f"present_value_{layer}"


def kv_scale_names(layer: int) -> tuple[str, str]:
    """(k_scale, v_scale) input names of `layer` in the int8-KV step graph."""
    return f"k_scale_{layer}", f"v_scale_{layer}"


def _step_model(weights: LlamaWeights, kv_int8: bool, block: int, bits: int) -> onnx.ModelProto:
    """One decode step over every layer (see the module docstring); with `kv_int8` the KV cache
    is int8 with per-channel scales as inputs (GroupQueryAttention's PER_CHANNEL quantization)."""
    spec = weights.spec
    b = _Builder("decode_step", block, bits)
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    kv_type = TensorProto.INT8 if kv_int8 else f32
    kv_shape: list[str | int | None] = [1, spec.n_kv_heads, "capacity", spec.head_dim]
    inputs = [
        helper.make_tensor_value_info("x", f32, [1, 1, spec.hidden]),
        helper.make_tensor_value_info("seqlens_k", i32, [1]),  # tokens held after this one, minus 1
        helper.make_tensor_value_info("total_length", i32, []),
        helper.make_tensor_value_info("cos", f32, ["rope_positions", spec.head_dim // 2]),
        helper.make_tensor_value_info("sin", f32, ["rope_positions", spec.head_dim // 2]),
    ]
    outputs = []
    attn = ""  # the previous layer's attention output
    normed, resid = b.rms_norm("x", weights.layers[0].attn_norm, spec.rms_eps), "x"
    for layer in range(spec.n_layers):
        w = weights.layers[layer]
        past_k, past_v, present_k, present_v = kv_names(layer)
        inputs += [helper.make_tensor_value_info(n, kv_type, kv_shape) for n in (past_k, past_v)]
        outputs += [helper.make_tensor_value_info(n, kv_type, kv_shape) for n in (present_k, present_v)]
        scales = []
        if kv_int8:
            scales = ["", "", "", *kv_scale_names(layer)]  # (position_ids, attention_bias, head_sink) unused
            inputs += [
                helper.make_tensor_value_info(n, f32, [1, spec.n_kv_heads, 1, spec.head_dim])
                for n in kv_scale_names(layer)
            ]
        if layer > 0:
            normed, resid = _mlp_then(b, weights, layer - 1, resid, attn, w.attn_norm)
        qkv = b.linear(normed, [w.wq, w.wk, w.wv], [w.bq, w.bk, w.bv], where=f"L{layer}.qkv")
        attn = b.tmp("attn")
        b.nodes.append(helper.make_node(
            "GroupQueryAttention",
            [qkv, "", "", past_k, past_v, "seqlens_k", "total_length", "cos", "sin", *scales],  # packed QKV
            [attn, present_k, present_v], name=attn, domain=MS_DOMAIN,
            num_heads=spec.n_heads, kv_num_heads=spec.n_kv_heads, scale=float(1.0 / np.sqrt(spec.head_dim)),
            do_rotary=1, rotary_interleaved=int(spec.rope_style == "adjacent"),
            # int8 cache: GroupQueryAttention's PER_CHANNEL quantization (make_node skips None attributes)
            k_quant_type="PER_CHANNEL" if kv_int8 else None, v_quant_type="PER_CHANNEL" if kv_int8 else None,
            kv_cache_bit_width=8 if kv_int8 else None,
        ))  # fmt: skip
    normed, _ = _mlp_then(b, weights, spec.n_layers - 1, resid, attn, weights.output_norm)
    b.nodes.append(helper.make_node("Identity", [normed], ["x_final"], name="out_x_final"))
    outputs.insert(0, helper.make_tensor_value_info("x_final", f32, [1, 1, spec.hidden]))
    return _model(helper.make_graph(b.nodes, b.name, inputs, outputs, b.inits))


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="mllm-deploy",
    )
    model.ir_version = 10
    return model


def _head_model(weights: LlamaWeights, bits: int) -> onnx.ModelProto:
    head = _Builder("decode_head", HEAD_BLOCK, bits)
    logits = head.linear("x_final", [weights.output], where="head")
    return head.model({"x_final": weights.spec.hidden}, {"logits": (logits, weights.spec.vocab)})


def head_bits(bits: int) -> int:
    """Bits of the output head's weights for decode weights of `bits`: always 8. Over 4-bit
    layers of 32 a 4-bit head measured mean KL 0.062 from float, the 8-bit one 0.0027
    (docs/method.md, decode graphs): the default model's head is its Q8_0 embedding."""
    return 8


def decode_model_builders(
    weights: LlamaWeights, block: int = BLOCK, bits: int = BITS, head: int | None = None
) -> dict[str, Callable[[], onnx.ModelProto]]:
    """`step` (float32 KV cache), `step_kv8` (int8 KV cache) and `head` (see the module
    docstring) with `bits`-bit blocks of `block` values (the head with `head` bits, by default
    `head_bits(bits)`, in blocks of `HEAD_BLOCK`), each built when called: a step graph is ~120 MB,
    so the cache writes one at a time."""
    head = head_bits(bits) if head is None else head
    return {
        "step": lambda: _step_model(weights, kv_int8=False, block=block, bits=bits),
        "step_kv8": lambda: _step_model(weights, kv_int8=True, block=block, bits=bits),
        "head": lambda: _head_model(weights, head),
    }


def build_decode_models(weights: LlamaWeights, block: int = BLOCK, bits: int = BITS) -> dict[str, onnx.ModelProto]:
    """Every decode graph, built now (tests and scripts; the cache uses `decode_model_builders`)."""
    return {name: build() for name, build in decode_model_builders(weights, block, bits).items()}


GRAPH_NAMES = ("step", "step_kv8", "head")
