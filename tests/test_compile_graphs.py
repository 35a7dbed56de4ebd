"""Per-layer QDQ graphs: shapes, dtypes, the audit, and which onnxruntime kernels really run."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mllm_deploy.compile import graphs
from mllm_deploy.compile.audit import GraphAuditError, audit_graph, integer_kernel_report
from mllm_deploy.compile.graphs import (
    build_layer_graphs,
    build_layer_models,
    max_abs_layer_act_quant,
    quantize_layer_weights,
    save_model_atomic,
)
from mllm_deploy.model.linears import GRAPH_KINDS
from mllm_deploy.model.spec import LayerWeights

HIDDEN, FFN, Q_DIM, KV_DIM, CHUNK = 64, 128, 64, 32, 16


def random_layer(seed: int = 0, bias: bool = False) -> LayerWeights:
    """A tiny Llama block with random weights scaled like a trained one (x @ W.T keeps unit scale)."""
    rng = np.random.default_rng(seed)

    def w(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def b(out: int):
        return (rng.standard_normal(out) * 0.1).astype(np.float32) if bias else None

    ones = np.ones(HIDDEN, np.float32)
    return LayerWeights(
        ones,
        w(Q_DIM, HIDDEN),
        w(KV_DIM, HIDDEN),
        w(KV_DIM, HIDDEN),
        w(HIDDEN, Q_DIM),
        ones,
        w(FFN, HIDDEN),
        w(FFN, HIDDEN),
        w(HIDDEN, FFN),
        bq=b(Q_DIM),
        bk=b(KV_DIM),
        bv=b(KV_DIM),
    )


def sample_activations(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "attn_in": rng.standard_normal((CHUNK, HIDDEN)).astype(np.float32),
        "attn_out": rng.standard_normal((CHUNK, Q_DIM)).astype(np.float32),
        "mlp_in": rng.standard_normal((CHUNK, HIDDEN)).astype(np.float32),
    }


def build_tiny(out_dir: Path, dtype="uint8", granularity="per-channel", bias=False, quantize_outputs=True):
    layer = random_layer(bias=bias)
    acts = sample_activations()
    act = max_abs_layer_act_quant(layer, acts["attn_in"], acts["attn_out"], acts["mlp_in"], dtype, quantize_outputs)
    return layer, act, build_layer_graphs(layer, 0, CHUNK, act, granularity, out_dir)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_layer_graph_shapes_and_dtypes(tmp_path):
    _, _, built = build_tiny(tmp_path)
    assert list(built) == list(GRAPH_KINDS)
    assert built["qkv"].inputs == {"x_norm": (CHUNK, HIDDEN)}
    assert built["qkv"].outputs == {"q": (CHUNK, Q_DIM), "k": (CHUNK, KV_DIM), "v": (CHUNK, KV_DIM)}
    assert built["o_proj"].inputs == {"attn_out": (CHUNK, Q_DIM)}
    assert built["gate_up"].outputs == {"h": (CHUNK, FFN)}
    assert built["down"].inputs == {"h": (CHUNK, FFN)} and built["down"].outputs == {"mlp_out": (CHUNK, HIDDEN)}
    model = onnx.load(built["qkv"].path)
    assert model.opset_import[0].version == graphs.OPSET
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    w_q = initializer(model, "attn_q_weight_q")
    assert w_q.dtype == np.int8 and w_q.shape == (HIDDEN, Q_DIM)  # W^T, [in, out]
    assert initializer(model, "attn_q_weight_scale").shape == (Q_DIM,)
    assert initializer(model, "x_norm_input_zero_point").dtype == np.uint8
    # every float initializer is a scale; no float weight is left in the graph
    float_inits = [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert all(name.endswith("_scale") for name in float_inits)
    # one quantized input shared by the three linears
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 1 + 3  # input + 3 outputs


def test_weights_stored_are_the_quantized_layer_weights(tmp_path):
    layer, _, built = build_tiny(tmp_path, granularity="per-tensor")
    expected = quantize_layer_weights(layer, "per-tensor")["ffn_down"]
    model = onnx.load(built["down"].path)
    np.testing.assert_array_equal(initializer(model, "ffn_down_weight_q"), expected.q.T)
    assert initializer(model, "ffn_down_weight_scale").shape == ()


def test_audit_accepts_qdq_graphs(tmp_path):
    _, _, built = build_tiny(tmp_path, dtype="uint16")
    report = audit_graph(built["qkv"].path, require_quantized_outputs=True)
    assert report.matmuls == 3
    assert set(report.activation_dtypes.values()) == {"uint16"}
    assert set(report.weight_dtypes.values()) == {"int8"}
    assert all(report.quantized_outputs.values())


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def test_audit_refuses_a_float_matmul(tmp_path):
    w = numpy_helper.from_array(np.ones((HIDDEN, HIDDEN), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="float_mm")],
        "float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [CHUNK, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [CHUNK, HIDDEN])],
        [w],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    with pytest.raises(GraphAuditError) as err:
        audit_graph(_save(model, tmp_path / "float.onnx"))
    assert any("float_mm" in p and "float matmul" in p for p in err.value.problems)
    assert len(err.value.problems) == 2  # both the activation and the weight side


def test_audit_refuses_unquantized_activation_even_with_int8_weights(tmp_path):
    layer = random_layer()
    weights = quantize_layer_weights(layer, "per-channel")
    acts = sample_activations()
    act = max_abs_layer_act_quant(layer, acts["attn_in"], acts["attn_out"], acts["mlp_in"], "uint8")
    model = build_layer_models(layer, 0, CHUNK, act, weights)["down"]
    # cut the input Q/DQ: the MatMul now reads the float graph input directly
    mm = next(n for n in model.graph.node if n.op_type == "MatMul")
    mm.input[0] = "h"
    keep = [n for n in model.graph.node if not n.name.startswith("h_input")]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    kept_inits = [t for t in model.graph.initializer if not t.name.startswith("h_input")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits)
    with pytest.raises(GraphAuditError, match="activation input 'h' comes from a graph input"):
        audit_graph(_save(model, tmp_path / "half.onnx"))


def test_audit_for_qnn_requires_requantized_outputs(tmp_path):
    _, _, built = build_tiny(tmp_path, quantize_outputs=False)
    assert audit_graph(built["down"].path).quantized_outputs == {"ffn_down_matmul": False}
    with pytest.raises(GraphAuditError, match="not re-quantized"):
        audit_graph(built["down"].path, require_quantized_outputs=True)


def test_audit_refuses_invalid_and_dynamic_graphs(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(GraphAuditError):
        audit_graph(bad)
    _, _, built = build_tiny(tmp_path)
    model = onnx.load(built["down"].path)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "tokens"
    with pytest.raises(GraphAuditError, match="not static"):
        audit_graph(_save(model, tmp_path / "dynamic.onnx"))


def test_large_weights_go_to_external_data_and_still_load(tmp_path, monkeypatch):
    monkeypatch.setattr(graphs, "EXTERNAL_DATA_THRESHOLD_BYTES", 1000)
    _, _, built = build_tiny(tmp_path)
    path = built["gate_up"].path
    assert (tmp_path / f"{path.name}.data").stat().st_size >= 2 * FFN * HIDDEN
    assert path.stat().st_size < FFN * HIDDEN  # the .onnx itself holds no weights
    audit_graph(path, require_quantized_outputs=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left over


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    _, _, built = build_tiny(tmp_path)
    before = built["down"].path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(graphs.onnx, "save_model", fail)
    with pytest.raises(OSError):
        save_model_atomic(onnx.load(built["qkv"].path), built["down"].path)
    assert built["down"].path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
def test_ort_cpu_runs_uint8_graphs_on_integer_kernels(tmp_path, granularity):
    _, _, built = build_tiny(tmp_path, granularity=granularity)
    for kind, expected in (("qkv", 3), ("gate_up", 2), ("down", 1)):
        report = integer_kernel_report(built[kind].path)
        assert report["provider"] == "CPUExecutionProvider"
        assert report["integer_kernels"] == {"QLinearMatMul": expected}
        assert report["float_matmuls"] == [] and report["all_linears_integer"]


def test_float_outputs_run_as_matmul_integer_to_float(tmp_path):
    _, _, built = build_tiny(tmp_path, quantize_outputs=False)
    report = integer_kernel_report(built["qkv"].path)
    assert report["integer_kernels"] == {"MatMulIntegerToFloat": 3} and report["all_linears_integer"]


def test_uint16_activations_have_no_integer_kernel_on_ort_cpu(tmp_path):
    """onnxruntime turns DQ→MatMul with 16-bit activations into MatMulNBits (float activations);
    the report must say so rather than claim INT8 execution."""
    _, _, built = build_tiny(tmp_path, dtype="uint16")
    report = integer_kernel_report(built["down"].path)
    assert report["integer_kernels"] == {} and not report["all_linears_integer"]
    assert [
        (m["op_type"], m["attributes"]["bits"], m["attributes"]["accuracy_level"]) for m in report["float_matmuls"]
    ] == [("MatMulNBits", 8, 1)]


def test_biased_linears_are_integer_gemms_with_int32_bias(tmp_path):
    layer, act, built = build_tiny(tmp_path, bias=True)
    model = onnx.load(built["qkv"].path)
    bias_q = initializer(model, "attn_q_bias_q")
    assert bias_q.dtype == np.int32
    w_scale = initializer(model, "attn_q_weight_scale")
    np.testing.assert_allclose(
        bias_q * act.attn_in.scale * w_scale, layer.bq, atol=float(act.attn_in.scale * w_scale.max())
    )
    report = integer_kernel_report(built["qkv"].path)
    assert report["integer_kernels"] == {"QGemm": 3} and report["all_linears_integer"]
