"""ort-cpu and the numpy float reference on a tiny layer: agreement within quantization bounds."""

import numpy as np
import pytest
from float_graphs import (
    NumpyFloatBackend,
    float_layer_graphs,
    load_float_graph,
    save_float_graph,
)
from test_compile_graphs import CHUNK, build_tiny, sample_activations

from mllm_deploy.backends.base import BackendError
from mllm_deploy.backends.ort_cpu import OrtCpuBackend
from mllm_deploy.compile.graphs import quantize_layer_weights
from mllm_deploy.compile.quantize import linear_error_bound


def layer_feeds(layer) -> dict[str, dict[str, np.ndarray]]:
    acts = sample_activations()
    h = float_layer_graphs(layer, 0, CHUNK)["gate_up"].apply(acts["mlp_in"])["h"]
    return {
        "qkv": {"x_norm": acts["attn_in"]},
        "o_proj": {"attn_out": acts["attn_out"]},
        "gate_up": {"x_norm": acts["mlp_in"]},
        "down": {"h": h},
    }


INPUT_GRID = {"qkv": "attn_in", "o_proj": "attn_out", "gate_up": "mlp_in", "down": "down_in"}


def linear_bound(x, weight, in_grid, out_grid):
    """Input and weight rounding (linear_error_bound), the int32 bias rounding (half an
    accumulator step s_x·s_w) and half an output step."""
    bias_step = in_grid.scale * weight.scale / 2
    return linear_error_bound(x, weight, in_grid) + bias_step + (out_grid.scale / 2 if out_grid else 0.0)


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
def test_ort_cpu_agrees_with_float_within_quantization_bound(tmp_path, dtype, granularity):
    layer, act, built = build_tiny(tmp_path, dtype=dtype, granularity=granularity, bias=True)
    weights = quantize_layer_weights(layer, granularity)
    floats = float_layer_graphs(layer, 0, CHUNK)
    cpu, ref = OrtCpuBackend(npu_threads=1), NumpyFloatBackend()
    feeds = layer_feeds(layer)
    linears = {"qkv": ["attn_q", "attn_k", "attn_v"], "o_proj": ["attn_output"], "down": ["ffn_down"]}
    for kind, names in linears.items():
        got = cpu.run(cpu.load(built[kind].path), feeds[kind])
        want = ref.run(ref.load(floats[kind]), feeds[kind])
        x = next(iter(feeds[kind].values()))
        in_grid = getattr(act, INPUT_GRID[kind])
        for out_name, lin in zip(got, names, strict=False):
            bound = linear_bound(x, weights[lin], in_grid, act.outputs[lin])
            err = np.abs(got[out_name] - want[out_name])
            assert np.all(err <= bound * 1.001 + 1e-5), (kind, out_name, err.max(), bound.max())
            assert err.max() > 0  # it really is the quantized path
    # gate/up: propagate the two linear bounds through h = silu(g)·u (|silu'| <= 1.1)
    x = feeds["gate_up"]["x_norm"]
    g, u = x @ layer.w_gate.T, x @ layer.w_up.T
    bg = linear_bound(x, weights["ffn_gate"], act.mlp_in, act.outputs["ffn_gate"])
    bu = linear_bound(x, weights["ffn_up"], act.mlp_in, act.outputs["ffn_up"])
    bound_h = 1.1 * bg * (np.abs(u) + bu) + (np.abs(g / (1 + np.exp(-g))) + 1.1 * bg) * bu
    got_h = cpu.run(cpu.load(built["gate_up"].path), feeds["gate_up"])["h"]
    assert np.all(np.abs(got_h - floats["gate_up"].apply(x)["h"]) <= bound_h * 1.001 + 1e-5)


def test_ort_cpu_uint8_is_the_exact_integer_computation(tmp_path):
    """QLinearMatMul reproduces requantize(clamp_q(x) @ W_q.T) to the last output code."""
    layer, act, built = build_tiny(tmp_path, dtype="uint8", granularity="per-channel")
    w = quantize_layer_weights(layer, "per-channel")["attn_output"]
    x = sample_activations()["attn_out"]
    out = act.outputs["attn_output"]
    exact = out.fake_quantize(act.attn_out.fake_quantize(x) @ w.dequantize().T)
    cpu = OrtCpuBackend()
    got = cpu.run(cpu.load(built["o_proj"].path), {"attn_out": x})["attn_proj"]
    assert np.abs(got - exact).max() <= out.scale * 1e-3


def test_ort_cpu_describe_and_threads(tmp_path):
    _, _, built = build_tiny(tmp_path)
    cpu = OrtCpuBackend(npu_threads=2)
    handle = cpu.load(built["down"].path)
    assert set(handle.assigned_nodes) == {"CPUExecutionProvider"}
    assert handle.impl.get_session_options().intra_op_num_threads == 2
    info = cpu.describe()
    assert info["name"] == "ort-cpu" and info["provider"] == "CPUExecutionProvider"
    assert info["device_mode"] == "ort-cpu emulation" and info["threads"] == 2
    with pytest.raises(ValueError):
        OrtCpuBackend(npu_threads=0)


def test_backend_rejects_wrong_inputs(tmp_path):
    _, _, built = build_tiny(tmp_path)
    cpu = OrtCpuBackend()
    handle = cpu.load(built["down"].path)
    with pytest.raises(BackendError, match="shape"):
        cpu.run(handle, {"h": np.zeros((CHUNK + 1, 128), np.float32)})
    with pytest.raises(BackendError, match="expected inputs"):
        cpu.run(handle, {"x": np.zeros((CHUNK, 128), np.float32)})


def test_float_graph_npz_round_trip(tmp_path):
    layer, _, _ = build_tiny(tmp_path, bias=True)
    graph = float_layer_graphs(layer, 3, CHUNK)["qkv"]
    loaded = load_float_graph(save_float_graph(graph, tmp_path / "qkv.npz"))
    ref = NumpyFloatBackend()
    x = sample_activations()["attn_in"]
    a = ref.run(ref.load(graph), {"x_norm": x})
    b = ref.run(ref.load(tmp_path / "qkv.npz"), {"x_norm": x})
    assert loaded.name == "layer3_qkv" and list(a) == ["q", "k", "v"]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_allclose(a["q"], x @ layer.wq.T + layer.bq, rtol=1e-5, atol=1e-6)
    assert ref.describe()["device_mode"].startswith("cpu float32")


def test_load_sizes_shares_one_session_and_holds_each_handle_to_its_static_size(tmp_path):
    """The tail graphs: one session (one copy of the weights) behind a handle per static size;
    the smaller size gives exactly the first rows of the full one (a linear is row-wise)."""
    layer, _, built = build_tiny(tmp_path, dtype="uint8", granularity="per-channel", bias=True)
    cpu = OrtCpuBackend(npu_threads=1)
    tail = CHUNK // 2
    sizes = cpu.load_sizes(built["qkv"].path, (CHUNK, tail))
    full, small = sizes[CHUNK], sizes[tail]
    assert full.impl is small.impl
    assert {s[0] for s in full.inputs.values()} == {CHUNK} and {s[0] for s in small.outputs.values()} == {tail}
    static = cpu.load(built["qkv"].path)
    assert full.inputs == static.inputs and full.outputs == static.outputs
    x = layer_feeds(layer)["qkv"]["x_norm"]  # [CHUNK, hidden]
    want = cpu.run(static, {"x_norm": x})
    got_full = cpu.run(full, {"x_norm": x})
    got_small = cpu.run(small, {"x_norm": np.ascontiguousarray(x[:tail])})
    for name, value in want.items():
        np.testing.assert_array_equal(got_full[name], value)
        np.testing.assert_array_equal(got_small[name], value[:tail])
    with pytest.raises(BackendError, match="shape"):  # only the planned static sizes run
        cpu.run(small, {"x_norm": np.ascontiguousarray(x[: tail - 1])})
