"""INT8 CPU decode (onnxruntime MatMulNBits segments + numpy attention) against the float engine."""

from __future__ import annotations

import numpy as np
import pytest

from mllm_deploy.model import load_weights, read_spec
from mllm_deploy.runtime.decode_fast import (
    Int8Decoder,
    build_decode_models,
    cached_decode_graphs,
    dequantize_blocks_u8,
    quantize_blocks_u8,
)
from mllm_deploy.runtime.float_engine import FloatEngine

import tiny_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_models.TinyConfig(n_layers=2, hidden=64, ffn=96, n_heads=4, n_kv_heads=2, context=256)
    path = tiny_models.write_tiny_gguf(tmp_path_factory.mktemp("tiny"), tied=True, cfg=cfg)
    spec = read_spec(str(path))
    return spec, load_weights(spec, use_cache=False)


def test_block_quantization_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 70)).astype(np.float32)  # 70: a padded last block
    q, scale = quantize_blocks_u8(w)
    assert q.shape == (5, 3, 32) and scale.shape == (5, 3) and q.dtype == np.uint8
    back = dequantize_blocks_u8(q, scale)[:, :70]
    step = np.repeat(scale, 32, axis=1)[:, :70]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-7)
    assert q.min() >= 1 and q.max() <= 255  # symmetric: -127..127 around 128


def test_int8_decode_follows_the_float_engine(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path))
    spec, weights = tiny
    engine = FloatEngine(weights)
    graphs = cached_decode_graphs(spec, lambda: weights)
    assert sorted(p.name for p in graphs.glob("*.onnx")) == sorted([f"seg{i}.onnx" for i in range(3)] + ["head.onnx"])
    assert cached_decode_graphs(spec, lambda: pytest.fail("rebuilt a cached entry")) == graphs
    decoder = Int8Decoder(spec, weights.tok_embd, engine.rope, graphs, threads=1)
    prompt = [5, 17, 99, 3, 250, 40, 41]
    ref_cache, cache = engine.new_cache(64), engine.new_cache(64)
    engine.prefill(ref_cache, prompt, chunk_size=4)
    engine.prefill(cache, prompt, chunk_size=4)
    for token in (7, 100, 200, 33):
        ref = engine.decode_step(ref_cache, token)
        got = decoder.decode_step(cache, token)
        cos = float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
        assert cos > 0.999, cos
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
        assert not np.array_equal(got, ref)  # really the integer path
    assert cache.token_ids == ref_cache.token_ids
    n = cache.length
    np.testing.assert_allclose(cache.k[:, :n], ref_cache.k[:, :n], atol=0.05 * np.abs(ref_cache.k[:, :n]).max())


def test_decode_graphs_use_8bit_integer_matmuls(tiny):
    spec, weights = tiny
    models = build_decode_models(weights)
    for name, model in models.items():
        ops = [n.op_type for n in model.graph.node]
        assert "MatMul" not in ops and "Gemm" not in ops, name
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert nbits, name
        for node in nbits:
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs["bits"] == 8 and attrs["accuracy_level"] == 4 and attrs["block_size"] == 32


def test_embedding_rows_read_from_a_memory_mapped_table(tmp_path):
    from mllm_deploy.runtime.file_rows import FileRows

    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    np.save(tmp_path / "t.npy", table)
    mapped = np.load(tmp_path / "t.npy", mmap_mode="r")
    for source in (mapped, table):
        rows = FileRows(source)
        np.testing.assert_array_equal(rows[np.array([3, 3, 49, 0])], table[[3, 3, 49, 0]])
        np.testing.assert_array_equal(rows[7], table[7])
    assert FileRows(mapped)._file is not None  # really the pread path
    with pytest.raises(IndexError):
        FileRows(mapped)[np.array([50])]
