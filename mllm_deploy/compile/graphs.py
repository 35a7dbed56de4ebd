"""Static-shape QDQ ONNX graphs for one transformer layer's linear work.

Chunk-sharing: a graph depends only on the chunk length (its static batch dimension), the
layer's weights and the calibrated activation grids, never on the chunk's position in the
prompt, so one graph per layer and kind serves every chunk of every prompt.

Each layer is cut into four graphs, with a boundary wherever the CPU must see float values
(attention inputs and outputs, and the input of every linear that shadow outlier execution may
correct):

    qkv      x_norm   [chunk, hidden] → q [chunk, q_dim], k [chunk, kv_dim], v [chunk, kv_dim]
    o_proj   attn_out [chunk, q_dim]  → attn_proj [chunk, hidden]
    gate_up  x_norm   [chunk, hidden] → h = silu(gate) · up [chunk, ffn]
    down     h        [chunk, ffn]    → mlp_out [chunk, hidden]

Every linear is the standard QDQ pattern

    x ─QuantizeLinear(act)─DequantizeLinear─┐
    W^T int8 ──────────DequantizeLinear(w)──┴─MatMul─QuantizeLinear(out)─DequantizeLinear─→ y

which onnxruntime's CPU provider fuses into QLinearMatMul (uint8) and QNN maps to an INT8
FullyConnected on HTP. The output Q/DQ pair is what makes QNN HTP take the MatMul as a
quantized op at all: measured with onnxruntime-qnn 2.7 on the v75 simulator, a DQ→MatMul with a
float output and per-channel weights is refused ("Unsupported nodes in QNN EP:
DequantizeLinear"). A linear built with `output=None` keeps a float output instead, which
onnxruntime's CPU provider runs as MatMulIntegerToFloat (slightly more accurate, ort-cpu only).
QuantizeLinear saturates, so the NPU computes on clamp(x): exactly the split that shadow
outlier execution relies on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from mllm_deploy.compile.quantize import (
    ActDtype,
    ActQuant,
    QuantizedWeight,
    WeightGranularity,
    activation_quant_symmetric,
    quantize_weight,
)
from mllm_deploy.model.linears import LINEAR_GROUP, GraphKind
from mllm_deploy.model.spec import LayerWeights

# Opset 21 is the first with uint16/int16 QuantizeLinear/DequantizeLinear in the default
# domain; onnxruntime 1.32 CPU and onnxruntime-qnn 2.7 both accept it (checked by the tests).
OPSET = 21
IR_VERSION = 10
EXTERNAL_DATA_THRESHOLD_BYTES = 64 << 20  # weights above this go to a `.data` file next to the .onnx

_ONNX_DTYPE = {"uint8": TensorProto.UINT8, "uint16": TensorProto.UINT16}


@dataclass(frozen=True)
class QuantizedLinear:
    """One linear inside a graph: y = clamp_q(x) @ W_q.T (+ bias)."""

    name: str  # GGUF-style name: "attn_q", "ffn_down", ...
    weight: QuantizedWeight  # int8 [out, in]
    output: ActQuant | None  # grid of x @ W.T + bias; None = float output (ort-cpu only)
    bias: np.ndarray | None = None  # float32 [out]; stored int32 on the accumulator grid (Gemm)


@dataclass(frozen=True)
class LayerActQuant:
    """Calibrated per-tensor grids of one layer: every linear input, and every linear output
    (keys of `outputs` are the linear names of `ModelSpec.linear_shapes()`)."""

    attn_in: ActQuant  # x_norm before attention → q/k/v
    attn_out: ActQuant  # attention output → o_proj
    mlp_in: ActQuant  # x_norm before the MLP → gate/up
    down_in: ActQuant  # h = silu(gate)·up → down
    outputs: dict[str, ActQuant | None] = field(default_factory=dict)


@dataclass(frozen=True)
class BuiltGraph:
    """A graph file and the names/shapes of its float inputs and outputs."""

    kind: GraphKind
    layer: int
    chunk_tokens: int
    path: Path
    inputs: dict[str, tuple[int, ...]]  # name → [chunk, width]
    outputs: dict[str, tuple[int, ...]]


def max_abs_layer_act_quant(
    layer: LayerWeights,
    attn_in: np.ndarray,
    attn_out: np.ndarray,
    mlp_in: np.ndarray,
    dtype: ActDtype,
    quantize_outputs: bool = True,
) -> LayerActQuant:
    """Symmetric grids set to the max |value| of sample float activations of one layer:
    attn_in / mlp_in [tokens, hidden] (normed inputs), attn_out [tokens, q_dim].

    The down input and every linear output are computed here in float from those samples.
    This is the `outliers.policy = "none"` choice of scales (nothing clamped on the samples);
    calibration replaces the input clamps with percentiles for shadow outlier execution.
    """

    def grid(values: np.ndarray) -> ActQuant:
        return activation_quant_symmetric(float(np.abs(values).max()), dtype)

    products = {
        "attn_q": _plus(attn_in @ layer.wq.T, layer.bq),
        "attn_k": _plus(attn_in @ layer.wk.T, layer.bk),
        "attn_v": _plus(attn_in @ layer.wv.T, layer.bv),
        "attn_output": attn_out @ layer.wo.T,
        "ffn_gate": mlp_in @ layer.w_gate.T,
        "ffn_up": mlp_in @ layer.w_up.T,
    }
    gate = products["ffn_gate"]
    h = gate / (1.0 + np.exp(-gate)) * products["ffn_up"]  # [tokens, ffn]
    products["ffn_down"] = h @ layer.w_down.T
    return LayerActQuant(
        attn_in=grid(attn_in),
        attn_out=grid(attn_out),
        mlp_in=grid(mlp_in),
        down_in=grid(h),
        outputs={name: grid(y) if quantize_outputs else None for name, y in products.items()},
    )


def _plus(y: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    return y if bias is None else y + bias


def quantize_layer_weights(layer: LayerWeights, granularity: WeightGranularity) -> dict[str, QuantizedWeight]:
    """INT8 weights of one layer's seven linears, keyed like `ModelSpec.linear_shapes()`."""
    float_weights = {
        "attn_q": layer.wq,
        "attn_k": layer.wk,
        "attn_v": layer.wv,
        "attn_output": layer.wo,
        "ffn_gate": layer.w_gate,
        "ffn_up": layer.w_up,
        "ffn_down": layer.w_down,
    }
    return {name: quantize_weight(w, granularity) for name, w in float_weights.items()}


def _scalar(name: str, value: float, dtype: npt.DTypeLike) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _act_qdq(
    src: str,
    prefix: str,
    act: ActQuant,
    nodes: list[onnx.NodeProto],
    inits: list[TensorProto],
    out: str | None = None,
) -> str:
    """Append Q→DQ of `src` on the grid `act`; return the DQ output name (`out` if given)."""
    scale, zp = f"{prefix}_scale", f"{prefix}_zero_point"
    out = out or f"{prefix}_dq"
    inits += [_scalar(scale, act.scale, np.float32), _scalar(zp, act.zero_point, act.numpy_dtype)]
    nodes.append(helper.make_node("QuantizeLinear", [src, scale, zp], [f"{prefix}_q"], name=f"{prefix}_quantize"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}_q", scale, zp], [out], name=f"{prefix}_dequantize"))
    return out


def _linear(
    x_dq: str,
    linear: QuantizedLinear,
    act_in: ActQuant,
    out_name: str,
    nodes: list[onnx.NodeProto],
    inits: list[TensorProto],
) -> None:
    """Append the quantized linear reading `x_dq` and writing `out_name`.

    Without bias: DQ(W^T int8 [in, out]) → MatMul → [Q → DQ]. With bias: a Gemm with transB
    on W int8 [out, in] and the bias as int32 on the accumulator grid (scale s_x·s_w, zero
    point 0), the QDQ form both onnxruntime (QGemm) and QNN (FullyConnected with bias) run as
    one integer op, so the bias never goes through a float (fp16 on HTP) add.
    """
    w = linear.weight
    n = linear.name
    per_channel = w.granularity == "per-channel"
    gemm = linear.bias is not None
    w_int8 = w.q if gemm else np.ascontiguousarray(w.q.T)  # Gemm: [out, in]; MatMul: [in, out]
    inits.append(numpy_helper.from_array(w_int8, f"{n}_weight_q"))
    inits.append(numpy_helper.from_array(w.scale, f"{n}_weight_scale"))
    inits.append(numpy_helper.from_array(np.zeros(w.scale.shape, np.int8), f"{n}_weight_zero_point"))
    axis = (0 if gemm else 1) if per_channel else None  # the output-channel axis (make_node skips None)
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [f"{n}_weight_q", f"{n}_weight_scale", f"{n}_weight_zero_point"],
            [f"{n}_weight_dq"],
            name=f"{n}_weight_dequantize",
            axis=axis,
        )
    )
    product = f"{n}_matmul" if linear.output is not None else out_name
    if gemm:
        bias_scale = (np.float32(act_in.scale) * w.scale).astype(np.float32)  # [] or [out]
        bias_q = np.rint(np.asarray(linear.bias, np.float64) / bias_scale).astype(np.int32)  # [out]
        inits.append(numpy_helper.from_array(bias_q, f"{n}_bias_q"))
        inits.append(numpy_helper.from_array(bias_scale, f"{n}_bias_scale"))
        inits.append(numpy_helper.from_array(np.zeros(w.scale.shape, np.int32), f"{n}_bias_zero_point"))
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{n}_bias_q", f"{n}_bias_scale", f"{n}_bias_zero_point"],
                [f"{n}_bias_dq"],
                name=f"{n}_bias_dequantize",
                axis=0 if per_channel else None,
            )
        )
        nodes.append(
            helper.make_node("Gemm", [x_dq, f"{n}_weight_dq", f"{n}_bias_dq"], [product], name=f"{n}_matmul", transB=1)
        )
    else:
        nodes.append(helper.make_node("MatMul", [x_dq, f"{n}_weight_dq"], [product], name=f"{n}_matmul"))
    if linear.output is not None:
        _act_qdq(product, f"{n}_output", linear.output, nodes, inits, out=out_name)


def build_linear_group_model(
    graph_name: str,
    input_name: str,
    chunk_tokens: int,
    input_quant: ActQuant,
    linears: list[QuantizedLinear],
    output_names: list[str],
    swiglu: bool = False,
) -> onnx.ModelProto:
    """One quantized input shared by several linears. With `swiglu`, exactly two linears
    (gate, up) whose outputs combine into one output silu(gate)·up, computed in float."""
    width_in = linears[0].weight.q.shape[1]
    if any(lin.weight.q.shape[1] != width_in for lin in linears):
        raise ValueError(f"{graph_name}: linears disagree on the input width")
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    x_dq = _act_qdq(input_name, f"{input_name}_input", input_quant, nodes, inits)
    if swiglu:
        gate, up = linears
        _linear(x_dq, gate, input_quant, "gate", nodes, inits)
        _linear(x_dq, up, input_quant, "up", nodes, inits)
        nodes.append(helper.make_node("Sigmoid", ["gate"], ["gate_sigmoid"], name="silu_sigmoid"))
        nodes.append(helper.make_node("Mul", ["gate", "gate_sigmoid"], ["gate_silu"], name="silu_mul"))
        nodes.append(helper.make_node("Mul", ["gate_silu", "up"], [output_names[0]], name="swiglu_mul"))
        out_widths = [up.weight.q.shape[0]]
    else:
        for lin, out_name in zip(linears, output_names, strict=True):
            _linear(x_dq, lin, input_quant, out_name, nodes, inits)
        out_widths = [lin.weight.q.shape[0] for lin in linears]
    graph = helper.make_graph(
        nodes,
        graph_name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [chunk_tokens, width_in])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [chunk_tokens, width])
            for name, width in zip(output_names, out_widths, strict=True)
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mllm-deploy")
    model.ir_version = IR_VERSION
    return model


def build_layer_models(
    layer: LayerWeights,
    layer_index: int,
    chunk_tokens: int,
    act: LayerActQuant,
    weights: dict[str, QuantizedWeight],
    split_gate_up: bool = False,
) -> dict[GraphKind, onnx.ModelProto]:
    """The four graphs of one layer, in memory. With `split_gate_up` the gate_up graph returns
    gate [chunk, ffn] and up [chunk, ffn] (quantized outputs) instead of silu(gate)·up, so that a
    shadow outlier correction can be added to both before the CPU applies silu·mul."""

    def lin(name: str, bias: np.ndarray | None = None) -> QuantizedLinear:
        return QuantizedLinear(name, weights[name], act.outputs.get(name), bias)

    prefix = f"layer{layer_index}"
    return {
        "qkv": build_linear_group_model(
            f"{prefix}_qkv",
            LINEAR_GROUP["qkv"].graph_input,
            chunk_tokens,
            act.attn_in,
            [lin("attn_q", layer.bq), lin("attn_k", layer.bk), lin("attn_v", layer.bv)],
            ["q", "k", "v"],
        ),
        "o_proj": build_linear_group_model(
            f"{prefix}_o_proj",
            LINEAR_GROUP["o_proj"].graph_input,
            chunk_tokens,
            act.attn_out,
            [lin("attn_output")],
            ["attn_proj"],
        ),
        "gate_up": build_linear_group_model(
            f"{prefix}_gate_up",
            LINEAR_GROUP["gate_up"].graph_input,
            chunk_tokens,
            act.mlp_in,
            [lin("ffn_gate"), lin("ffn_up")],
            ["gate", "up"] if split_gate_up else ["h"],
            swiglu=not split_gate_up,
        ),
        "down": build_linear_group_model(
            f"{prefix}_down",
            LINEAR_GROUP["down"].graph_input,
            chunk_tokens,
            act.down_in,
            [lin("ffn_down")],
            ["mlp_out"],
        ),
    }


def save_model_atomic(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path` so readers see the old files or the new ones, never half.

    Weights above EXTERNAL_DATA_THRESHOLD_BYTES go to `<name>.data` next to the .onnx. Both
    files are written in a temporary sibling directory and moved into place (data first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES
    data_name = f"{path.name}.data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        if external:
            onnx.save_model(
                model,
                tmp_model,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(tmp_dir / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, tmp_model)
        with open(tmp_model, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def build_layer_graphs(
    layer: LayerWeights,
    layer_index: int,
    chunk_tokens: int,
    act: LayerActQuant,
    weight_granularity: WeightGranularity,
    out_dir: Path,
    split_gate_up: bool = False,
) -> dict[GraphKind, BuiltGraph]:
    """Quantize one layer's weights, build its four graphs and save them as
    `out_dir/layer{i}_{kind}.onnx`. The caller audits them (`compile.audit`) before use."""
    weights = quantize_layer_weights(layer, weight_granularity)
    models = build_layer_models(layer, layer_index, chunk_tokens, act, weights, split_gate_up)
    built: dict[GraphKind, BuiltGraph] = {}
    for kind, model in models.items():
        path = save_model_atomic(model, Path(out_dir) / f"layer{layer_index}_{kind}.onnx")
        built[kind] = BuiltGraph(
            kind=kind,
            layer=layer_index,
            chunk_tokens=chunk_tokens,
            path=path,
            inputs={i.name: _shape(i) for i in model.graph.input},
            outputs={o.name: _shape(o) for o in model.graph.output},
        )
    return built


def _shape(value_info: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in value_info.type.tensor_type.shape.dim)
