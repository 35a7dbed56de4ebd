"""Prefill attention over the int8 KV cache in integer kernels (`prefill.attention = "int8"`):
earlier chunks in integer products, the own chunk in float; it is causal, it agrees with float
attention over the same cache, its output is a convex combination of the values, and
the DAG prefill and the float engine (what `eval` measures) both use it when asked."""

from __future__ import annotations

import numpy as np
import pytest
from dag_fixtures import CHUNK, IDS, float_reference, make_prefill, run_all
from npu_doubles import FloatKernels

from mllm_deploy.forward.kv_cache import KVCache, KVScales
from mllm_deploy.forward.layers import causal_attention
from mllm_deploy.runtime.attention_int8 import Int8ChunkAttention, attention_model


class Spec:
    n_heads, n_kv_heads, head_dim, n_layers = 6, 2, 16, 2


def filled_cache(rng, n_positions: int, layer_scale: float = 1.0) -> KVCache:
    k = rng.standard_normal((Spec.n_layers, Spec.n_kv_heads, Spec.head_dim)).astype(np.float32)
    scales = KVScales.from_absmax(np.abs(k) + 3.0, np.full_like(k, 3.0))
    cache = KVCache(Spec.n_layers, n_positions, Spec.n_kv_heads, Spec.head_dim, scales=scales)
    cache.reserve(n_positions)
    for layer in range(Spec.n_layers):
        keys = rng.standard_normal((n_positions, Spec.n_kv_heads, Spec.head_dim)).astype(np.float32) * layer_scale
        values = rng.standard_normal((n_positions, Spec.n_kv_heads, Spec.head_dim)).astype(np.float32)
        cache.store(layer, 0, keys, values)
    return cache


def test_earlier_chunks_multiply_in_integers_and_the_own_chunk_in_float():
    nodes = attention_model(Spec).graph.node
    integer = [node for node in nodes if node.op_type == "MatMulInteger"]
    float_products = [node for node in nodes if node.op_type == "MatMul"]
    assert [node.input[1] for node in integer] == ["past_keys_t", "past_values"]
    assert [node.input[1] for node in float_products] == ["own_keys_t", "own_values"]
    assert "Softmax" not in [node.op_type for node in nodes]  # weights exp(s - max) in float


def own_rows(rng, n_real):
    keys = rng.standard_normal((n_real, Spec.n_kv_heads, Spec.head_dim)).astype(np.float32)
    return keys, rng.standard_normal((n_real, Spec.n_kv_heads, Spec.head_dim)).astype(np.float32)


@pytest.mark.parametrize(("start", "n_real", "n_rows"), [(0, 8, 8), (24, 8, 8), (40, 5, 8), (3, 1, 1)])
def test_agrees_with_float_attention_over_the_same_cache(start, n_real, n_rows):
    rng = np.random.default_rng(start + n_real)
    cache = filled_cache(rng, start + n_real)
    q = rng.standard_normal((n_rows, Spec.n_heads, Spec.head_dim)).astype(np.float32)
    own_keys, own_values = own_rows(rng, n_real)
    attend = Int8ChunkAttention(Spec)
    for layer in range(Spec.n_layers):
        out = attend(q, cache, layer, start, own_keys, own_values)
        keys, values = cache.attention_window(layer, start, own_keys, own_values)  # earlier rows from int8, own exact
        ref = causal_attention(q, keys, values, start, Spec.n_kv_heads)
        assert out.shape == (n_rows, Spec.n_heads * Spec.head_dim) and out.dtype == np.float32
        err = np.linalg.norm(out[:n_real] - ref[:n_real]) / np.linalg.norm(ref[:n_real])
        if start == 0:  # nothing earlier: the own chunk alone, in float32
            assert err < 1e-6, err
        else:
            assert 0 < err < 0.05, err  # rounding of queries and weights, not exact
        assert np.isfinite(out).all()  # padding rows too


def test_identical_values_come_back_whatever_the_weights_round_to():
    """The output is a convex combination even where most weights round to zero: it is
    normalised by the sum of the weights as quantized (the ones column of V)."""
    rng = np.random.default_rng(3)
    start, n_real = 200, 4
    cache = filled_cache(rng, start + n_real, layer_scale=4.0)  # peaked rows: many weights < 1/510
    value = np.linspace(-2.5, 2.5, Spec.head_dim, dtype=np.float32)
    cache.store(
        0, 0, cache.keys(0, start).transpose(1, 0, 2), np.broadcast_to(value, (start, Spec.n_kv_heads, Spec.head_dim))
    )
    exact = cache.values(0, start)[0, 0]  # the value as the int8 cache holds it
    own_keys, _ = own_rows(rng, n_real)
    own_values = np.broadcast_to(exact, (n_real, Spec.n_kv_heads, Spec.head_dim)).copy()
    q = 3 * rng.standard_normal((n_real, Spec.n_heads, Spec.head_dim)).astype(np.float32)
    out = Int8ChunkAttention(Spec)(q, cache, 0, start, own_keys, own_values)
    np.testing.assert_allclose(
        out.reshape(n_real, Spec.n_heads, Spec.head_dim),
        np.broadcast_to(exact, (n_real, Spec.n_heads, Spec.head_dim)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_query_never_sees_a_later_key():
    rng = np.random.default_rng(7)
    start, n = 16, 8
    cache = filled_cache(rng, start + n)
    q = rng.standard_normal((n, Spec.n_heads, Spec.head_dim)).astype(np.float32)
    own_keys, own_values = own_rows(rng, n)
    attend = Int8ChunkAttention(Spec)
    before = attend(q, cache, 0, start, own_keys, own_values)
    own_keys[5:], own_values[5:] = 9.0, -9.0  # the last three keys and values change
    after = attend(q, cache, 0, start, own_keys, own_values)
    np.testing.assert_array_equal(after[:5], before[:5])  # rows 0..4 sit before them
    assert not np.allclose(after[5:], before[5:])


def test_needs_an_int8_cache():
    cache = KVCache(Spec.n_layers, 8, Spec.n_kv_heads, Spec.head_dim)
    with pytest.raises(ValueError, match="int8 KV cache"):
        zeros = np.zeros((8, Spec.n_kv_heads, Spec.head_dim), np.float32)
        Int8ChunkAttention(Spec)(np.zeros((8, Spec.n_heads, Spec.head_dim), np.float32), cache, 0, 0, zeros, zeros)


def _int8_scales(spec, k_absmax=4.0, v_absmax=4.0):
    shape = (spec.n_layers, spec.n_kv_heads, spec.head_dim)
    return KVScales.from_absmax(np.full(shape, k_absmax, np.float32), np.full(shape, v_absmax, np.float32))


def test_dag_prefill_and_float_engine_use_it_on_int8_caches(tiny_three_layers):
    _, spec, weights = tiny_three_layers
    prefill, engine = make_prefill(
        tiny_three_layers, FloatKernels(weights, CHUNK), "out-of-order", 2, "outliers.prune_fraction=1.0"
    )
    try:
        scales = _int8_scales(spec)
        float_attention = run_all(prefill, engine.new_cache(256, scales=scales), IDS)[1]
        prefill.chunk_attention = Int8ChunkAttention(spec)
        int8_attention = run_all(prefill, engine.new_cache(256, scales=scales), IDS)[1]
        engine.chunk_attention = prefill.chunk_attention  # the path eval measures
        cache = engine.new_cache(256, scales=scales)
        sequential = engine.prefill(cache, IDS, chunk_size=CHUNK, pad_last_chunk=True).logits
        float_cache_logits = run_all(prefill, engine.new_cache(256), IDS)[1]  # float32 cache: float attention
    finally:
        prefill.close()
    np.testing.assert_allclose(sequential, int8_attention, rtol=1e-4, atol=1e-4)
    assert not np.array_equal(int8_attention, float_attention)  # it really ran the integer graph
    cos = float(
        np.dot(int8_attention[0], float_attention[0])
        / np.linalg.norm(int8_attention[0])
        / np.linalg.norm(float_attention[0])
    )
    assert cos > 0.99
    engine.chunk_attention = None
    ref = float_reference(engine, IDS)[0]
    np.testing.assert_allclose(float_cache_logits, ref, rtol=1e-4, atol=1e-4)
