"""Every Hexagon HTP generation qnn-htp targets compiles and runs one real layer's graphs.

For each registered HTP arch (backends.registry.HTP_ARCHS: v68, v69, v73, v75, v79, v81, which
covers every `npu.htp_arch` of the device catalog), layer 0 of the real default model
(SmolLM2-135M, weights read from its GGUF) is built at chunk 16 as A16W8 QDQ graphs (uint16
activations in and out, int8 per-channel weights), compiled ahead of time as QNN context binaries
for that arch on onnxruntime-qnn's x86-64 HTP simulator, loaded and run on one input of realistic
activations; every output is compared with float32 numpy. Where the registry says an arch has no
float arithmetic (v68), gate_up is built split (gate and up out) and the runtime's kernels
(`NpuLayerKernels.run_graph`) apply SiLU·mul on the CPU — and the fused float SiLU·mul is checked
to be really refused there.

Cost: ~1 s per arch on this machine (2 shared cores), ~9 s for the module with the weights.
"""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest

from mllm_deploy.backends.base import BackendError
from mllm_deploy.backends.registry import HTP_ARCHS, htp_arch_support
from mllm_deploy.compile.graphs import build_layer_graphs, max_abs_layer_act_quant
from mllm_deploy.device import device_ids, load_capabilities
from mllm_deploy.device.models import HtpArch
from mllm_deploy.model import load_weights, read_spec
from mllm_deploy.model.spec import LayerWeights
from mllm_deploy.runtime.npu_kernels import NpuLayerKernels

qnn_htp = pytest.importorskip("mllm_deploy.backends.qnn_htp")

CHUNK = 16
COSINE_MIN = 0.9998  # A16W8 against float32: measured >= 0.99986 (v, int8 weights) on every arch;
# the same graphs with uint8 activations fall below it (q: 0.99947 on v75)
SOC_OF_ARCH = {68: 35, 69: 36, 73: 43, 75: 57, 79: 69, 81: 87}  # a QnnTypes.h SoC id of each generation


def _silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    out: np.ndarray = gate / (1.0 + np.exp(-gate)) * up
    return out


def _rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + 1e-5) * w
    return out


@pytest.fixture(scope="module")
def real_layer() -> tuple[LayerWeights, dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Layer 0 of the default model, graph inputs from real token embeddings, and float outputs.

    Attention is a plain causal softmax over the layer's own q/k/v without RoPE: what matters
    here is that each graph's input is a realistic activation, not the attention itself."""
    spec = read_spec("builtin:smollm2-135m-instruct")
    weights = load_weights(spec, on_demand=True)  # dequantized from the GGUF, nothing written
    layer = weights.layers[0]
    ids = np.random.default_rng(0).integers(0, spec.vocab, CHUNK)
    x = np.stack([np.asarray(weights.tok_embd[int(i)], np.float32) for i in ids])  # [chunk, hidden]
    attn_in = _rms(x, layer.attn_norm)
    q, k, v = attn_in @ layer.wq.T, attn_in @ layer.wk.T, attn_in @ layer.wv.T
    h, d = spec.n_heads, spec.head_dim
    group = spec.n_heads // spec.n_kv_heads
    qh = q.reshape(CHUNK, h, d).transpose(1, 0, 2)
    kh = np.repeat(k.reshape(CHUNK, -1, d).transpose(1, 0, 2), group, axis=0)
    vh = np.repeat(v.reshape(CHUNK, -1, d).transpose(1, 0, 2), group, axis=0)
    scores = np.where(np.tril(np.ones((CHUNK, CHUNK), bool)), qh @ kh.transpose(0, 2, 1) / np.sqrt(d), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    attn_out = ((probs / probs.sum(-1, keepdims=True)) @ vh).transpose(1, 0, 2).reshape(CHUNK, h * d)
    attn_proj = attn_out @ layer.wo.T
    mlp_in = _rms(x + attn_proj, layer.ffn_norm)
    gate, up = mlp_in @ layer.w_gate.T, mlp_in @ layer.w_up.T
    act = _silu_mul(gate, up)
    feeds = {
        "qkv": {"x_norm": attn_in},
        "o_proj": {"attn_out": attn_out},
        "gate_up": {"x_norm": mlp_in},
        "down": {"h": act},
    }
    want = {
        "q": q,
        "k": k,
        "v": v,
        "attn_proj": attn_proj,
        "h": act,
        "gate": gate,
        "up": up,
        "mlp_out": act @ layer.w_down.T,
    }
    return layer, feeds, {name: np.asarray(y, np.float32) for name, y in want.items()}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def test_registry_covers_the_catalog_and_the_profile_type():
    assert tuple(f"v{a}" for a in HTP_ARCHS) == typing.get_args(HtpArch)  # one list of generations
    for device_id in device_ids():
        npu = load_capabilities(device_id).npu
        if npu is None or npu.htp_arch_number is None:
            continue
        arch = htp_arch_support(npu.htp_arch_number)  # KeyError: a catalogued arch nobody registered
        assert npu.supports_int16_activations == arch.int16_activations, device_id
        assert arch.source  # where the facts come from
    with pytest.raises(KeyError, match="registered: v68"):
        htp_arch_support(70)


@pytest.mark.parametrize("arch", list(HTP_ARCHS))
def test_real_layer_compiles_and_runs_on_every_htp_arch(tmp_path: Path, real_layer, arch: int):
    layer, feeds, want = real_layer
    support = htp_arch_support(arch)
    assert support.int16_activations  # every registered arch runs A16W8 (else build uint8 here)
    grids = max_abs_layer_act_quant(
        layer, feeds["qkv"]["x_norm"], feeds["o_proj"]["attn_out"], feeds["gate_up"]["x_norm"], "uint16"
    )
    split = not support.float_elementwise  # what resolve + build do for this arch (silu_mul_on_cpu)
    built = build_layer_graphs(layer, 0, CHUNK, grids, "per-channel", tmp_path / "graphs", split_gate_up=split)
    qnn = qnn_htp.QnnHtpBackend(htp_arch=arch, soc_model=SOC_OF_ARCH[arch])
    handles = {}
    for kind, graph in built.items():
        ctx = qnn.compile_context(graph.path, tmp_path / "contexts" / f"{graph.path.stem}.ctx.onnx")
        handle = handles[(0, kind)] = qnn.load(ctx)
        assert set(handle.assigned_nodes) == {"QNNExecutionProvider"}
        assert list(handle.outputs) == (["gate", "up"] if kind == "gate_up" and split else list(graph.outputs))
    # what the runtime computes from them (an unshadowed split gate_up: SiLU·mul on the CPU)
    kernels = NpuLayerKernels(qnn, handles, {}, chunk_tokens=CHUNK, backend_label=f"v{arch}", latencies={})
    for kind, graph in built.items():
        (x,) = feeds[kind].values()
        names = ["h"] if kind == "gate_up" else list(graph.outputs)
        for name, y in zip(names, kernels.run_graph(0, kind, x), strict=True):
            assert y.shape == want[name].shape
            cos = _cosine(y, want[name])
            assert cos >= COSINE_MIN, f"v{arch} {kind}.{name}: cosine {cos:.6f} against float32"


def test_float_silu_mul_is_refused_where_the_registry_says_so(tmp_path: Path, real_layer):
    """The registry's `float_elementwise = False` is QNN's own verdict, not a guess: the fused
    gate_up graph does not compile for v68, and does for an arch that has float math."""
    layer, feeds, _ = real_layer
    grids = max_abs_layer_act_quant(
        layer, feeds["qkv"]["x_norm"], feeds["o_proj"]["attn_out"], feeds["gate_up"]["x_norm"], "uint16"
    )
    fused = build_layer_graphs(layer, 0, CHUNK, grids, "per-channel", tmp_path, split_gate_up=False)["gate_up"]
    no_float = [a for a, s in HTP_ARCHS.items() if not s.float_elementwise]
    assert no_float == [68]
    with pytest.raises(BackendError, match=r"silu_sigmoid|fallback"):
        qnn_htp.QnnHtpBackend(htp_arch=68, soc_model=SOC_OF_ARCH[68]).compile_context(
            fused.path, tmp_path / "v68.ctx.onnx"
        )
    qnn_htp.QnnHtpBackend(htp_arch=69, soc_model=SOC_OF_ARCH[69]).compile_context(fused.path, tmp_path / "v69.ctx.onnx")
