"""INT8 CPU decode (one onnxruntime graph per token: MatMulNBits + GroupQueryAttention) against the float engine."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import tiny_models

from mllm_deploy.compile.decode_cache import cached_decode_graphs
from mllm_deploy.compile.decode_graphs import BLOCK, build_decode_models, dequantize_blocks_u8, quantize_blocks_u8
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.model import load_weights, read_spec
from mllm_deploy.resolve.memory import HEAD_BLOCK
from mllm_deploy.runtime.decode_fast import Int8Decoder

TINY_CFG = tiny_models.TinyConfig(n_layers=2, hidden=64, ffn=96, n_heads=4, n_kv_heads=2, context=256)


@pytest.fixture(scope="module", params=["gguf", "hf"])
def tiny(tmp_path_factory, request):
    """A GGUF model (adjacent-pair RoPE) and a Hugging Face one (half-split RoPE)."""
    folder = tmp_path_factory.mktemp("tiny")
    if request.param == "gguf":
        path = tiny_models.write_tiny_gguf(folder, tied=True, cfg=TINY_CFG)
    else:
        path = tiny_models.write_tiny_hf(folder, cfg=TINY_CFG)
    spec = read_spec(str(path))
    assert spec.rope_style == {"gguf": "adjacent", "hf": "half"}[request.param]
    return spec, load_weights(spec, use_cache=False)


@pytest.mark.parametrize("block, n_blocks", [(None, 2), (32, 3)])  # None: the default, BLOCK = 64
def test_block_quantization_round_trip_within_half_a_step(block, n_blocks):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 70)).astype(np.float32)  # 70: a padded last block
    q, scale = quantize_blocks_u8(w) if block is None else quantize_blocks_u8(w, block)
    width = block or BLOCK
    assert q.shape == (5, n_blocks, width) and scale.shape == (5, n_blocks) and q.dtype == np.uint8
    back = dequantize_blocks_u8(q, scale)[:, :70]
    step = np.repeat(scale, width, axis=1)[:, :70]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-7)
    assert q.min() >= 1 and q.max() <= 255  # symmetric: -127..127 around 128


def test_int8_decode_follows_the_float_engine(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path))
    spec, weights = tiny
    engine = FloatEngine(weights)
    graphs = cached_decode_graphs(spec, lambda: weights)
    assert sorted(p.name for p in graphs.glob("*.onnx")) == ["head.onnx", "step.onnx", "step_kv8.onnx"]
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
    # the graph wrote the decoded tokens' rotated K/V into the cache's own buffers
    np.testing.assert_allclose(
        cache.k[:, :, :n], ref_cache.k[:, :, :n], atol=0.05 * np.abs(ref_cache.k[:, :, :n]).max()
    )
    np.testing.assert_allclose(
        cache.v[:, :, :n], ref_cache.v[:, :, :n], atol=0.05 * np.abs(ref_cache.v[:, :, :n]).max()
    )
    assert not cache.k[:, :, n:].any()  # nothing beyond the held positions


def test_int8_decode_rebinds_to_another_cache_and_continues_after_prefill(tiny, tmp_path, monkeypatch):
    """A copied cache (new buffers) and a prefill on top of decoded tokens (multi-turn chat)."""
    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path))
    spec, weights = tiny
    engine = FloatEngine(weights)
    decoder = Int8Decoder(spec, weights.tok_embd, engine.rope, cached_decode_graphs(spec, lambda: weights), threads=2)
    cache = engine.new_cache(64)
    engine.prefill(cache, [5, 17, 99], chunk_size=4)
    first = decoder.decode_step(cache, 7)
    fork = copy.deepcopy(cache)
    np.testing.assert_allclose(decoder.decode_step(fork, 8), decoder.decode_step(cache, 8), rtol=1e-5, atol=1e-5)
    assert fork.token_ids == cache.token_ids == [5, 17, 99, 7, 8]
    engine.prefill(cache, [40, 41, 42], chunk_size=4)  # next turn, on top of decoded tokens
    ref_cache = engine.new_cache(64)
    engine.prefill(ref_cache, [5, 17, 99, 7, 8, 40, 41, 42], chunk_size=4)
    got, ref = decoder.decode_step(cache, 3), engine.decode_step(ref_cache, 3)
    assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999
    assert first.shape == (spec.vocab,)


def test_decode_step_graph_attends_in_onnxruntime(tiny):
    spec, weights = tiny
    step = build_decode_models(weights)["step"]
    gqa = [n for n in step.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == spec.n_layers
    attrs = {a.name: a.i for a in gqa[0].attribute if a.type == onnx.AttributeProto.INT}
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == int(spec.rope_style == "adjacent")
    assert attrs["num_heads"] == spec.n_heads and attrs["kv_num_heads"] == spec.n_kv_heads
    kv = [i for i in step.graph.input if i.name.startswith("past_")]
    assert len(kv) == 2 * spec.n_layers


def test_decode_graphs_use_8bit_integer_matmuls(tiny):
    _, weights = tiny
    models = build_decode_models(weights)
    for name, model in models.items():
        ops = [n.op_type for n in model.graph.node]
        assert "MatMul" not in ops and "Gemm" not in ops, name
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert nbits, name
        for node in nbits:
            attrs = {a.name: a.i for a in node.attribute}
            block = HEAD_BLOCK if name == "head" else BLOCK  # the head: blocks of 32 (a Q8_0 embedding exactly)
            assert attrs["bits"] == 8 and attrs["accuracy_level"] == 4 and attrs["block_size"] == block
    assert BLOCK == 64 and HEAD_BLOCK == 32


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


def test_int8_decode_follows_the_cache_when_it_grows(tiny, tmp_path, monkeypatch):
    """Decoding across the cache's growth steps rebinds the graph to the new buffers."""
    from mllm_deploy.forward import kv_cache

    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path))
    monkeypatch.setattr(kv_cache, "GROWTH", 8)
    spec, weights = tiny
    engine = FloatEngine(weights)
    decoder = Int8Decoder(spec, weights.tok_embd, engine.rope, cached_decode_graphs(spec, lambda: weights), threads=1)
    cache, ref_cache = engine.new_cache(64), engine.new_cache(64)
    for c in (cache, ref_cache):
        engine.prefill(c, [5, 17, 99, 3, 250, 40], chunk_size=4)
    assert cache.allocated == 8
    for token in (7, 100, 200, 33, 9, 12):  # positions 6..11: past 8 allocated
        ref, got = engine.decode_step(ref_cache, token), decoder.decode_step(cache, token)
        assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999
    assert cache.allocated == 16 and cache.length == 12
    np.testing.assert_allclose(
        cache.k[:, :, :12], ref_cache.k[:, :, :12], atol=0.05 * np.abs(ref_cache.k[:, :, :12]).max()
    )


def test_int8_decoder_does_not_keep_old_cache_buffers_alive(tiny, tmp_path, monkeypatch):
    """The graph's binding holds a cache's K/V; dropping the cache (or growing it) must free the
    old buffers, or the next cache doubles the KV memory (the bench's peak RSS)."""
    import gc
    import weakref

    from mllm_deploy.forward import kv_cache

    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path))
    monkeypatch.setattr(kv_cache, "GROWTH", 8)
    spec, weights = tiny
    engine = FloatEngine(weights)
    decoder = Int8Decoder(spec, weights.tok_embd, engine.rope, cached_decode_graphs(spec, lambda: weights), threads=1)
    cache = engine.new_cache(64)
    engine.prefill(cache, [5, 17, 99, 3, 250, 40], chunk_size=4)
    decoder.decode_step(cache, 7)
    before_growth = weakref.ref(cache.k)
    for token in (8, 9):  # position 8: the buffers are reallocated
        decoder.decode_step(cache, token)
    gc.collect()
    assert before_growth() is None
    current = weakref.ref(cache.k)
    del cache  # e.g. the bench's next run, or a new chat: its cache is filled before any decode
    gc.collect()
    assert current() is None
    second = engine.new_cache(64)
    engine.prefill(second, [5, 17], chunk_size=4)
    assert decoder.decode_step(second, 7).shape == (spec.vocab,)


def test_decode_step_graph_fuses_each_residual_add_with_the_next_norm(tiny):
    spec, weights = tiny
    ops = [n.op_type for n in build_decode_models(weights)["step"].graph.node]
    # per layer: after o_proj (-> ffn_norm) and after down (-> next attn_norm, or the output norm)
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * spec.n_layers
    assert ops.count("Add") == 1  # only the epsilon of layer 0's plain attn_norm (no biases here)


def _int8_copy(cache, scales):
    """An int8 KV cache holding `cache`'s positions, quantized with `scales`."""
    from mllm_deploy.forward.kv_cache import KVCache

    n_layers, n_kv, _, head_dim = cache.k.shape
    q = KVCache(n_layers, cache.capacity, n_kv, head_dim, scales=scales)
    q.reserve(cache.length)
    for layer in range(n_layers):
        q.store(
            layer,
            0,
            cache.k[layer, :, : cache.length].transpose(1, 0, 2),
            cache.v[layer, :, : cache.length].transpose(1, 0, 2),
        )
    q.advance(cache.token_ids)
    return q


def test_int8_kv_cache_decode_follows_the_float_engine(tiny, tmp_path, monkeypatch):
    """The int8-KV step graph (GroupQueryAttention PER_CHANNEL) on a quantized copy of the float
    engine's cache: same logits within int8 error, and the new positions it writes are the float
    engine's K/V quantized with the same steps."""
    from mllm_deploy.forward.kv_cache import KVScales

    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path))
    spec, weights = tiny
    engine = FloatEngine(weights)
    decoder = Int8Decoder(spec, weights.tok_embd, engine.rope, cached_decode_graphs(spec, lambda: weights), threads=1)
    ref_cache = engine.new_cache(64)
    engine.prefill(ref_cache, [5, 17, 99, 3, 250, 40, 41], chunk_size=4)
    n = ref_cache.length
    absmax = lambda a: np.abs(a[:, :, :n]).max(axis=2) * 1.5
    scales = KVScales.from_absmax(absmax(ref_cache.k), absmax(ref_cache.v))
    cache = _int8_copy(ref_cache, scales)
    assert cache.k.dtype == np.int8 and cache.keys(0, n).dtype == np.float32
    for token in (7, 100, 200):
        ref, got = engine.decode_step(ref_cache, token), decoder.decode_step(cache, token)
        assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.995
    assert "step_kv8" in decoder.sessions and "step" not in decoder.sessions  # only the graph in use is opened
    end = ref_cache.length
    for layer in range(spec.n_layers):
        step = scales.k[layer][:, None, :]
        expected = np.clip(ref_cache.k[layer, :, n:end], -127 * step, 127 * step)  # saturating
        decoded = cache.keys(layer, end)[:, n:end]
        err = np.abs(decoded - expected) - step / 2  # beyond rounding: the 8-bit weights' error
        assert err.max() < 0.1 * np.abs(expected).max(), (layer, err.max())


@pytest.mark.parametrize("block", [32, 128])
def test_each_weight_block_has_its_own_cached_graphs_and_follows_the_float_engine(tiny, tmp_path, monkeypatch, block):
    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path))
    spec, weights = tiny
    default = cached_decode_graphs(spec, lambda: weights)
    graphs = cached_decode_graphs(spec, lambda: weights, block)
    assert graphs != default and graphs.parent == default.parent
    assert cached_decode_graphs(spec, lambda: pytest.fail("rebuilt a cached entry"), block) == graphs
    for name in ("step", "step_kv8", "head"):
        sizes = {a.i for n in onnx.load(graphs / f"{name}.onnx").graph.node if n.op_type == "MatMulNBits"
                 for a in n.attribute if a.name == "block_size"}  # fmt: skip
        assert sizes == {HEAD_BLOCK if name == "head" else block}, name
    engine = FloatEngine(weights)
    decoder = Int8Decoder(spec, weights.tok_embd, engine.rope, graphs, threads=1)
    assert decoder.block == block and decoder.name == f"cpu-int8-ort-gqa b{block}"
    assert (
        Int8Decoder(spec, weights.tok_embd, engine.rope, build_decode_models(weights, block), threads=1).block == block
    )
    ref_cache, cache = engine.new_cache(32), engine.new_cache(32)
    for c in (ref_cache, cache):
        engine.prefill(c, [5, 17, 99, 3, 250], chunk_size=4)
    for token in (7, 100):
        ref, got = engine.decode_step(ref_cache, token), decoder.decode_step(cache, token)
        assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999


def test_npu_engine_builds_decode_graphs_with_the_profiles_weight_block(tiny, monkeypatch):
    from plan_fixtures import pinned_host

    from mllm_deploy.interface import engines
    from mllm_deploy.profile import load_profile
    from mllm_deploy.resolve import resolve

    spec, weights = tiny
    asked = []

    class Stop(Exception):
        pass

    def recording(spec_, loader, block=BLOCK, bits=8):
        asked.append((block, bits))
        raise Stop

    monkeypatch.setattr(engines, "obtain_artifacts", lambda resolved, **_: None)
    monkeypatch.setattr(engines, "cached_decode_graphs", recording)
    for setting, expected in (
        ([], (64, 8)),
        (["decode.weight_block=32"], (32, 8)),
        (["decode.weight_bits=4"], (64, 4)),
    ):
        loaded = load_profile(
            None, [f"model.source={spec.path}", "device.npu_backend=ort-cpu", "prefill.max_context=256", *setting]
        )
        with pytest.raises(Stop):
            engines.open_engine(resolve(loaded, pinned_host(), spec), weights)
        assert asked[-1] == expected


@pytest.mark.parametrize("block", [32, 64, 128])
def test_plan_counts_the_decode_graphs_weight_bytes_exactly(tiny, block):
    from mllm_deploy.resolve.memory import decode_weight_bytes

    spec, weights = tiny
    models = build_decode_models(weights, block)
    held = 0
    for name in ("step", "head"):
        inits = {i.name: i for i in models[name].graph.initializer}
        for node in models[name].graph.node:
            if node.op_type == "MatMulNBits":
                held += sum(onnx.numpy_helper.to_array(inits[n]).nbytes for n in node.input[1:3])
    assert decode_weight_bytes(spec, block) == held > 0


def test_a_damaged_decode_cache_manifest_is_rebuilt_not_trusted(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path))
    spec, weights = tiny
    graphs = cached_decode_graphs(spec, lambda: weights)
    (graphs / "manifest.json").write_text('{"format": 5, "blo')  # cut short
    built = []
    again = cached_decode_graphs(spec, lambda: built.append(1) or weights)
    assert again == graphs and built == [1]
    assert json.loads((graphs / "manifest.json").read_text())["block"] == BLOCK
    assert sorted(p.name for p in graphs.parent.iterdir()) == [graphs.name]  # no temporary left behind
    assert Int8Decoder(spec, weights.tok_embd, FloatEngine(weights).rope, graphs, threads=1).block == BLOCK
