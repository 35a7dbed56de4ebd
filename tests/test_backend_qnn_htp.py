"""qnn-htp on Qualcomm's x86-64 HTP simulator (a real Hexagon NPU on a Snapdragon).

Tiny graphs only: the simulator is hundreds of times slower than the CPU.

Tolerance versus ort-cpu: both backends compute the same exact int32 accumulator
Σ (x_q - zp)·w_q; they may differ in rounding when quantizing the float input (one code) and
when requantizing the accumulator to the output grid (HTP uses a fixed-point multiplier,
onnxruntime a float one). That is at most a couple of output steps: we allow 2 steps for
uint8 and 4 for uint16 (measured: ≤ 1 and ≤ 3). silu·mul runs in HTP's float (fp16) path.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_backend_ort_cpu import layer_feeds
from test_compile_graphs import CHUNK, HIDDEN, build_tiny

from mllm_deploy.backends.base import BackendError
from mllm_deploy.backends.ort_cpu import OrtCpuBackend
from mllm_deploy.compile import graphs
from mllm_deploy.compile.audit import GraphAuditError, audit_graph

qnn_htp = pytest.importorskip("mllm_deploy.backends.qnn_htp")

OUTPUT_LINEAR = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "attn_proj": "attn_output", "mlp_out": "ffn_down"}
STEPS = {"uint8": 2, "uint16": 4}
FP16_EPS = 2.0**-10


@pytest.fixture(scope="module")
def qnn():
    return qnn_htp.QnnHtpBackend(htp_arch=75, soc_model=57)


def test_describe_says_simulator_and_options(qnn):
    info = qnn.describe()
    assert info["name"] == "qnn-htp" and info["provider"] == "QNNExecutionProvider"
    assert info["device_mode"] == "QNN HTP simulator v75"  # this test machine is x86-64
    assert qnn.provider_options() == {"backend_type": "htp", "htp_arch": "75", "soc_model": "57"}
    with pytest.raises(ValueError):
        qnn_htp.QnnHtpBackend(htp_arch=70)


@pytest.mark.parametrize("dtype, granularity", [("uint8", "per-channel"), ("uint16", "per-tensor")])
def test_tiny_layer_on_qnn_agrees_with_ort_cpu(tmp_path, qnn, dtype, granularity):
    layer, act, built = build_tiny(tmp_path, dtype=dtype, granularity=granularity, bias=True)
    cpu = OrtCpuBackend()
    feeds = layer_feeds(layer)
    k = STEPS[dtype]
    for kind, graph in built.items():
        audit_graph(graph.path, require_quantized_outputs=True)
        handle = qnn.load(graph.path)
        assert set(handle.assigned_nodes) == {"QNNExecutionProvider"}  # every node on HTP
        got = qnn.run(handle, feeds[kind])
        want = cpu.run(cpu.load(graph.path), feeds[kind])
        for name, value in got.items():
            err = np.abs(value - want[name])
            if name in OUTPUT_LINEAR:
                step = act.outputs[OUTPUT_LINEAR[name]].scale
                assert err.max() <= k * step * 1.001, (kind, name, err.max() / step)
            else:  # h = silu(gate)·up from gate/up that may each differ by k steps
                g_step, u_step = act.outputs["ffn_gate"].scale, act.outputs["ffn_up"].scale
                x = feeds["gate_up"]["x_norm"]
                g, u = x @ layer.w_gate.T, x @ layer.w_up.T
                silu = np.abs(g / (1 + np.exp(-g)))
                bound = 1.1 * k * g_step * (np.abs(u) + k * u_step) + (silu + 1.1 * k * g_step) * k * u_step
                # fp16 sigmoid/mul: a few ulp of sigmoid (≤ 1) scaled by |g·u|, plus of h itself
                bound += 4 * FP16_EPS * (np.abs(g * u) + np.abs(want[name]) + bound)
                assert np.all(err <= bound), (kind, name, err.max())
            assert err.max() < 0.1 * np.abs(want[name]).max()


def test_context_binary_compile_and_reload(tmp_path, qnn):
    _, _, built = build_tiny(tmp_path)
    cpu = OrtCpuBackend()
    for kind in ("o_proj", "gate_up"):
        context = qnn.compile_context(built[kind].path, tmp_path / "ctx" / f"{kind}_ctx.onnx")
        model = onnx.load(context)
        assert [(n.op_type, n.domain) for n in model.graph.node] == [("EPContext", "com.microsoft")]
        embedded = next(a for a in model.graph.node[0].attribute if a.name == "ep_cache_context")
        assert len(embedded.s) > 1000  # the QNN context binary itself
        direct, cached = qnn.load(built[kind].path), qnn.load(context)
        assert cached.inputs == direct.inputs and cached.outputs == direct.outputs
        x = {
            name: np.random.default_rng(3).standard_normal(shape).astype(np.float32)
            for name, shape in direct.inputs.items()
        }
        a, b = qnn.run(direct, x), qnn.run(cached, x)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])  # same binary, same bits
            assert np.abs(a[name] - cpu.run(cpu.load(built[kind].path), x)[name]).max() < 0.5
    assert sorted(p.name for p in (tmp_path / "ctx").iterdir()) == ["gate_up_ctx.onnx", "o_proj_ctx.onnx"]


def test_qnn_refuses_float_output_per_channel_matmul_instead_of_cpu_fallback(tmp_path, qnn):
    """With CPU fallback disabled a node HTP cannot take is an error: a per-channel DQ→MatMul
    without output Q/DQ is not a quantized node unit on HTP."""
    _, _, built = build_tiny(tmp_path, quantize_outputs=False)
    with pytest.raises(BackendError, match="fallback to CPU EP has been explicitly disabled"):
        qnn.load(built["down"].path)


def test_qnn_would_run_a_float_matmul_so_the_audit_must_refuse_it(tmp_path, qnn):
    w = numpy_helper.from_array(np.eye(HIDDEN, dtype=np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="float_mm")],
        "float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [CHUNK, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [CHUNK, HIDDEN])],
        [w],
    )
    path = tmp_path / "float.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", graphs.OPSET)]), path)
    x = np.random.default_rng(0).standard_normal((CHUNK, HIDDEN)).astype(np.float32)
    y = qnn.run(qnn.load(path), {"x": x})["y"]  # HTP takes it (in its float path)...
    np.testing.assert_allclose(y, x, atol=0.01)
    with pytest.raises(GraphAuditError, match="float matmul"):  # ...so our audit is what stops it
        audit_graph(path)


def test_qnn_native_log_lines_never_reach_stdout(tmp_path):
    """QNN's libraries print "# LIBNATIVE: ..." on stdout when a session is prepared; that would
    corrupt `run --json`. In a fresh process (the line is printed once per process), stdout stays
    empty while a graph is compiled to a context binary and loaded."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
        "from test_compile_graphs import build_tiny; from mllm_deploy.backends.qnn_htp import QnnHtpBackend; "
        "tmp = Path(sys.argv[1]); _, _, built = build_tiny(tmp); qnn = QnnHtpBackend(htp_arch=75); "
        "qnn.load(qnn.compile_context(built['down'].path, tmp / 'down_ctx.onnx'))"
    )
    tests_dir = str(Path(__file__).resolve().parent)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), tests_dir], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == ""
    assert "LIBNATIVE" in proc.stderr  # still shown, where diagnostics belong
