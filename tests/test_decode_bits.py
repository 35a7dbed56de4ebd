"""4-bit CPU decode weights (`decode.weight_bits = 4`): packing, graphs, cache, plan bytes, bundles."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny_models

from mllm_deploy.compile.decode_cache import cached_decode_graphs
from mllm_deploy.compile.decode_graphs import _Builder, build_decode_models, dequantize_blocks_u4, quantize_blocks_u4
from mllm_deploy.errors import ExitCode, UserError
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.interface.deployment import refuse_bundle_graph_overrides
from mllm_deploy.model import load_weights, read_spec
from mllm_deploy.profile import load_profile
from mllm_deploy.resolve.memory import decode_weight_bytes
from mllm_deploy.runtime.decode_fast import Int8Decoder

TINY_CFG = tiny_models.TinyConfig(n_layers=2, hidden=64, ffn=96, n_heads=4, n_kv_heads=2, context=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_models.write_tiny_gguf(tmp_path_factory.mktemp("tiny"), tied=True, cfg=TINY_CFG)
    spec = read_spec(str(path))
    return spec, load_weights(spec, use_cache=False)


def test_4bit_blocks_round_trip_within_half_a_step_with_packed_zero_points():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 70)).astype(np.float32) + 0.3  # 70: a padded last block; 3 blocks of 32
    q, scale, zero = quantize_blocks_u4(w, 32)
    assert q.shape == (5, 3, 16) and scale.shape == (5, 3) and zero.shape == (5, 2)  # 3 zero points in 2 bytes
    assert q.dtype == zero.dtype == np.uint8 and np.all(zero[:, 1] >> 4 == 0)  # the odd last nibble is padding
    back = dequantize_blocks_u4(q, scale, zero)[:, :70]
    step = np.repeat(scale, 32, axis=1)[:, :70]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    codes = np.stack([q & 15, q >> 4], axis=-1).reshape(5, 3, 32)
    assert codes.min() == 0 and codes.max() == 15  # the range is used


def test_a_4bit_matmul_reads_the_codes_and_zero_points_as_packed():
    """onnxruntime's MatMulNBits on one linear equals x @ the dequantized weights (up to its int8
    activation blocks): a wrong nibble order of codes or zero points would not come close."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 96)).astype(np.float32) - 0.2
    x = rng.standard_normal((1, 96)).astype(np.float32)
    b = _Builder("one", 32, 4)
    model = b.model({"x": 96}, {"y": (b.linear("x", [w]), 40)})
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = x @ dequantize_blocks_u4(*quantize_blocks_u4(w, 32))[:, :96].T
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


def test_4bit_decode_graphs_have_zero_points_their_own_cache_entry_and_follow_the_float_engine(
    tiny, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path))
    spec, weights = tiny
    eight = cached_decode_graphs(spec, lambda: weights, 32)
    four = cached_decode_graphs(spec, lambda: weights, 32, 4)
    assert four != eight and four.parent == eight.parent
    assert cached_decode_graphs(spec, lambda: pytest.fail("rebuilt a cached entry"), 32, 4) == four
    assert json.loads((four / "manifest.json").read_text())["bits"] == 4
    assert json.loads((eight / "manifest.json").read_text())["bits"] == 8
    for name in ("step", "step_kv8", "head"):
        model = onnx.load(four / f"{name}.onnx")
        inits = {i.name: i for i in model.graph.initializer}
        nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert nodes and {a.i for n in nodes for a in n.attribute if a.name == "bits"} == {4}, name
        for node in nodes:
            assert len(node.input) == 4 and inits[node.input[3]].data_type == onnx.TensorProto.UINT8, node.name
    engine = FloatEngine(weights)
    decoder = Int8Decoder(spec, weights.tok_embd, engine.rope, four, threads=1)
    assert (decoder.bits, decoder.block, decoder.name) == (4, 32, "cpu-int4-ort-gqa b32")
    built = Int8Decoder(spec, weights.tok_embd, engine.rope, build_decode_models(weights, 64, 4), threads=1)
    assert built.name == "cpu-int4-ort-gqa b64"
    ref_cache, cache = engine.new_cache(32), engine.new_cache(32)
    for c in (ref_cache, cache):
        engine.prefill(c, [5, 17, 99, 3, 250], chunk_size=4)
    for token in (7, 100):
        ref, got = engine.decode_step(ref_cache, token), decoder.decode_step(cache, token)
        # random tiny weights are 4-bit's worst case (8-bit: > 0.999); a misread nibble would be ~0
        assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.98


@pytest.mark.parametrize("block", [32, 64, 128])
def test_plan_counts_the_4bit_decode_graphs_bytes_exactly(tiny, block):
    spec, weights = tiny
    models = build_decode_models(weights, block, 4)
    held = 0
    for name in ("step", "head"):
        inits = {i.name: i for i in models[name].graph.initializer}
        for node in models[name].graph.node:
            if node.op_type == "MatMulNBits":
                held += sum(onnx.numpy_helper.to_array(inits[n]).nbytes for n in node.input[1:])
    assert decode_weight_bytes(spec, block, 4) == held > 0
    assert held < 0.6 * decode_weight_bytes(spec, block, 8)


def test_a_bundle_refuses_set_decode_weight_bits():
    loaded = load_profile(None, ["decode.weight_bits=4"])
    with pytest.raises(UserError) as raised:
        refuse_bundle_graph_overrides(loaded)
    assert raised.value.exit_code == ExitCode.INVALID
    assert "decode.weight_bits" in str(raised.value) and "cannot change" in str(raised.value)


def test_weight_bits_takes_4_or_8_only():
    assert load_profile(None, ["decode.weight_bits=4", "decode.weight_block=128"]).profile.decode.weight_bits == 4
    with pytest.raises(UserError) as raised:
        load_profile(None, ["decode.weight_bits=2"])
    assert "decode.weight_bits" in str(raised.value)
