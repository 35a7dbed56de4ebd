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


def test_4bit_blocks_round_trip_within_half_a_step_and_q4_1_blocks_exactly():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 70)).astype(np.float32) + 0.3  # 70: a padded last block; 3 blocks of 32
    q, scale, offset = quantize_blocks_u4(w, 32)
    assert q.shape == (5, 3, 16) and scale.shape == offset.shape == (5, 3) and q.dtype == np.uint8
    back = dequantize_blocks_u4(q, scale, offset)[:, :70]
    step = np.repeat(scale, 32, axis=1)[:, :70]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    codes = np.stack([q & 15, q >> 4], axis=-1).reshape(5, 3, 32)
    assert codes.min() == 0 and codes.max() == 15  # the range is used
    # a Q4_1 block as a GGUF dequantizes it (d * q + m, q in 0..15 with both ends used) comes back exactly
    d = rng.uniform(0.01, 0.1, (4, 2, 1)).astype(np.float32)
    m = rng.uniform(-1.0, 0.2, (4, 2, 1)).astype(np.float32)
    q4 = rng.integers(0, 16, (4, 2, 32))
    q4[..., 0], q4[..., 1] = 0, 15
    q4_1 = (d * q4 + m).astype(np.float32).reshape(4, 64)
    assert np.abs(dequantize_blocks_u4(*quantize_blocks_u4(q4_1, 32)) - q4_1).max() < 1e-6


@pytest.mark.parametrize("width", [96, 100])  # 100: a padded last block
def test_a_4bit_linear_reads_the_codes_and_offsets_as_packed(width):
    """The 4-bit linear (MatMulNBits + block-offset MatMul) equals x @ the dequantized weights (up
    to its int8 activation blocks): a wrong nibble order or offset would not come close."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, width)).astype(np.float32) - 0.2
    x = rng.standard_normal((1, width)).astype(np.float32)
    b = _Builder("one", 32, 4)
    model = b.model({"x": width}, {"y": (b.linear("x", [w]), 40)})
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = x @ dequantize_blocks_u4(*quantize_blocks_u4(w, 32))[:, :width].T
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


def test_4bit_decode_graphs_have_block_offsets_their_own_cache_entry_and_follow_the_float_engine(
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
    for name, bits in (("step", 4), ("step_kv8", 4), ("head", 8)):  # the head stays 8-bit
        model = onnx.load(four / f"{name}.onnx")
        nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert nodes and {a.i for n in nodes for a in n.attribute if a.name == "bits"} == {bits}, name
        assert all(len(n.input) == 3 for n in nodes)  # MatMulNBits' default zero point: no zero points input
        offsets = [n for n in model.graph.node if n.op_type == "MatMul"]
        assert len(offsets) == (len(nodes) if bits == 4 else 0), name
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
            if node.op_type in ("MatMulNBits", "MatMul"):  # weights, scales; the 4-bit blocks' offsets
                held += sum(onnx.numpy_helper.to_array(inits[n]).nbytes for n in node.input[1:])
    assert decode_weight_bytes(spec, block, 4) == held > 0
    assert held < 0.8 * decode_weight_bytes(spec, block, 8)


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
