"""Float engine on random numpy weights: against a naive reference, chunked == unchunked,
decode == recompute, padding never leaks, cache rollback.

The reference here is a naive full-recompute forward written independently of
mllm_deploy.runtime (loops over heads, complex-number RoPE, explicit causal mask), in float64."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.forward.layers import causal_attention
from mllm_deploy.model.spec import LayerWeights, LlamaWeights, ModelSpec


def random_llama_weights(
    *,
    seed: int = 0,
    n_layers: int = 2,
    hidden: int = 32,
    ffn: int = 48,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab: int = 64,
    rope_style: str = "adjacent",
    qkv_bias: bool = False,
    tied: bool = True,
    rope_theta: float = 10000.0,
) -> LlamaWeights:
    rng = np.random.default_rng(seed)
    head_dim = hidden // n_heads

    def mat(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def vec(n, around=1.0):
        return (around + 0.1 * rng.standard_normal(n)).astype(np.float32)

    spec = ModelSpec(
        source="test:random",
        path="",
        format="gguf" if rope_style == "adjacent" else "hf",
        architecture="qwen2" if qkv_bias else "llama",
        name="random",
        n_layers=n_layers,
        hidden=hidden,
        ffn=ffn,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        context=512,
        rope_theta=rope_theta,
        rope_style=rope_style,
        rms_eps=1e-5,
        tied_embeddings=tied,
        qkv_bias=qkv_bias,
        weight_bytes_f32=0,
        file_bytes=0,
    )
    layers = []
    for _ in range(n_layers):
        layers.append(
            LayerWeights(
                attn_norm=vec(hidden),
                wq=mat(n_heads * head_dim, hidden),
                wk=mat(n_kv_heads * head_dim, hidden),
                wv=mat(n_kv_heads * head_dim, hidden),
                wo=mat(hidden, n_heads * head_dim),
                ffn_norm=vec(hidden),
                w_gate=mat(ffn, hidden),
                w_up=mat(ffn, hidden),
                w_down=mat(hidden, ffn),
                bq=vec(n_heads * head_dim, 0.0) if qkv_bias else None,
                bk=vec(n_kv_heads * head_dim, 0.0) if qkv_bias else None,
                bv=vec(n_kv_heads * head_dim, 0.0) if qkv_bias else None,
            )
        )
    tok_embd = rng.standard_normal((vocab, hidden)).astype(np.float32)
    output = tok_embd if tied else mat(vocab, hidden)
    return LlamaWeights(spec=spec, tok_embd=tok_embd, layers=layers, output_norm=vec(hidden), output=output)


def _rope_complex(x: np.ndarray, theta: float, style: str) -> np.ndarray:
    """x [T, heads, d] in float64; rotation as multiplication by exp(i * pos * freq)."""
    n, _, d = x.shape
    freqs = theta ** (-np.arange(0, d, 2) / d)
    rot = np.exp(1j * np.arange(n)[:, None] * freqs[None, :])[:, None, :]  # [T, 1, d/2]
    if style == "adjacent":
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    else:
        z = (x[..., : d // 2] + 1j * x[..., d // 2 :]) * rot
        out = np.concatenate([z.real, z.imag], axis=-1)
    return out


def naive_forward(weights: LlamaWeights, token_ids: list[int]) -> np.ndarray:
    """Logits [T, vocab] for every position, float64, no cache."""
    spec = weights.spec
    d = spec.head_dim
    f64 = lambda a: None if a is None else a.astype(np.float64)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + spec.rms_eps) * f64(w)

    x = f64(weights.tok_embd)[token_ids]
    n = len(token_ids)
    for lw in weights.layers:
        h = norm(x, lw.attn_norm)
        q, k, v = h @ f64(lw.wq).T, h @ f64(lw.wk).T, h @ f64(lw.wv).T
        if lw.bq is not None:
            q, k, v = q + lw.bq, k + lw.bk, v + lw.bv
        q = _rope_complex(q.reshape(n, spec.n_heads, d), spec.rope_theta, spec.rope_style)
        k = _rope_complex(k.reshape(n, spec.n_kv_heads, d), spec.rope_theta, spec.rope_style)
        v = v.reshape(n, spec.n_kv_heads, d)
        group = spec.n_heads // spec.n_kv_heads
        heads = []
        for head in range(spec.n_heads):
            kv = head // group
            s = q[:, head, :] @ k[:, kv, :].T / np.sqrt(d)
            s[np.triu(np.ones((n, n), bool), 1)] = -np.inf
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            heads.append(p @ v[:, kv, :])
        x = x + np.concatenate(heads, axis=-1) @ f64(lw.wo).T
        h = norm(x, lw.ffn_norm)
        g = h @ f64(lw.w_gate).T
        x = x + ((g / (1 + np.exp(-g))) * (h @ f64(lw.w_up).T)) @ f64(lw.w_down).T
    return norm(x, weights.output_norm) @ f64(weights.output).T


PROMPT = [int(t) for t in np.random.default_rng(7).integers(0, 64, 300)]


def rel_max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(
    "variant",
    [
        dict(rope_style="adjacent"),
        dict(rope_style="half"),
        dict(rope_style="half", qkv_bias=True),
        dict(rope_style="adjacent", tied=False, n_kv_heads=4),
        dict(rope_style="adjacent", n_kv_heads=1),
    ],
    ids=["adjacent", "half", "qkv-bias", "untied-mha", "mqa"],
)
def test_prefill_matches_naive_reference(variant):
    weights = random_llama_weights(**variant)
    engine = FloatEngine(weights)
    prompt = PROMPT[:40]
    got = engine.prefill(engine.new_cache(64), prompt, chunk_size=64, logit_rows="all").logits
    want = naive_forward(weights, prompt)
    assert got.shape == (40, 64)
    assert rel_max_diff(got, want) < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_rope_styles_differ():
    """The two conventions are genuinely different rotations (guards against one silently aliasing the other)."""
    a = FloatEngine(random_llama_weights(rope_style="adjacent"))
    b = FloatEngine(random_llama_weights(rope_style="half"))
    la = a.prefill(a.new_cache(16), PROMPT[:10], chunk_size=16).logits
    lb = b.prefill(b.new_cache(16), PROMPT[:10], chunk_size=16).logits
    assert rel_max_diff(la, lb) > 1e-3


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 256])
@pytest.mark.parametrize("pad_last_chunk", [False, True])
def test_chunked_prefill_equals_unchunked(chunk_size, pad_last_chunk):
    engine = FloatEngine(random_llama_weights(rope_style="half", qkv_bias=True))
    whole = engine.prefill(engine.new_cache(512), PROMPT, chunk_size=len(PROMPT), logit_rows="all")
    cache = engine.new_cache(512)
    chunked = engine.prefill(cache, PROMPT, chunk_size=chunk_size, pad_last_chunk=pad_last_chunk, logit_rows="all")
    assert chunked.tokens == len(PROMPT) == cache.length
    assert chunked.chunks == -(-len(PROMPT) // chunk_size)
    assert rel_max_diff(chunked.logits, whole.logits) < 1e-4
    last = engine.prefill(engine.new_cache(512), PROMPT, chunk_size=chunk_size, pad_last_chunk=pad_last_chunk)
    assert last.logits.shape == (1, 64)
    assert rel_max_diff(last.logits[0], whole.logits[-1]) < 1e-4


def test_padding_never_reaches_cache_or_attention():
    """A padded last chunk leaves exactly the cache an unpadded one leaves, whatever the pad rows hold."""
    engine = FloatEngine(random_llama_weights())
    prompt = PROMPT[:21]  # chunks of 8: 8 + 8 + 5 real, 3 padding rows
    plain, padded = engine.new_cache(64), engine.new_cache(64)
    engine.prefill(plain, prompt, chunk_size=8)
    padded.k[:] = np.nan  # any read of an unwritten slot would poison the result
    padded.v[:] = np.nan
    out = engine.prefill(padded, prompt, chunk_size=8, pad_last_chunk=True, logit_rows="all")
    assert padded.length == 21 and padded.token_ids == prompt
    assert np.isfinite(out.logits).all()
    np.testing.assert_allclose(padded.k[:, :, :21], plain.k[:, :, :21], rtol=1e-5, atol=1e-5)
    assert np.isnan(padded.k[:, :, 21:]).all() and np.isnan(padded.v[:, :, 21:]).all()


def test_decode_steps_equal_full_recompute():
    weights = random_llama_weights(rope_style="half")
    engine = FloatEngine(weights)
    cache = engine.new_cache(64)
    engine.prefill(cache, PROMPT[:10], chunk_size=4)
    want = naive_forward(weights, PROMPT[:16])
    for pos in range(10, 16):
        logits = engine.decode_step(cache, PROMPT[pos])
        assert logits.shape == (64,)
        assert rel_max_diff(logits, want[pos]) < 1e-4
    assert cache.length == 16


def test_truncate_then_refill_equals_fresh():
    engine = FloatEngine(random_llama_weights())
    cache = engine.new_cache(64)
    engine.prefill(cache, PROMPT[:30], chunk_size=8)
    cache.truncate(12)
    assert cache.length == 12 and cache.common_prefix(PROMPT[:30]) == 12
    other = [5, 6, 7, 8, 9]
    got = engine.prefill(cache, other, chunk_size=8).logits
    want = engine.prefill(engine.new_cache(64), PROMPT[:12] + other, chunk_size=64).logits
    assert rel_max_diff(got, want) < 1e-5


def test_cancel_stops_between_chunks_and_keeps_cache_consistent():
    engine = FloatEngine(random_llama_weights())
    cache = engine.new_cache(64)
    cancel = threading.Event()
    seen = []

    def on_chunk(event):
        seen.append(event)
        if event.index == 1:
            cancel.set()

    result = engine.prefill(cache, PROMPT[:40], chunk_size=8, cancel=cancel, on_chunk=on_chunk)
    assert result.cancelled and result.logits is None
    assert result.tokens == 16 == cache.length
    assert [e.index for e in seen] == [0, 1] and all(e.n_chunks == 5 for e in seen)


def test_cache_overflow_is_refused():
    engine = FloatEngine(random_llama_weights())
    cache = engine.new_cache(8)
    with pytest.raises(ValueError, match="do not fit"):
        engine.prefill(cache, PROMPT[:9], chunk_size=4)


def test_causal_attention_masks_future_within_chunk():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 2, 4)).astype(np.float32)
    keys = rng.standard_normal((1, 5, 4)).astype(np.float32)  # [kv_heads, 2 earlier + 3 in this chunk, head_dim]
    values = np.zeros((1, 5, 4), np.float32)
    values[:, 4] = 1000.0  # only the last query may see position 4
    out = causal_attention(q, keys, values, start=2, n_kv_heads=1)
    assert np.abs(out[:2]).max() < 1e-6
    assert out[2].min() > 0


def test_kv_cache_grows_in_steps_keeping_what_it_holds(monkeypatch):
    from mllm_deploy.forward import kv_cache

    monkeypatch.setattr(kv_cache, "GROWTH", 8)
    cache = kv_cache.KVCache(n_layers=2, capacity=20, n_kv_heads=1, head_dim=4)
    assert cache.allocated == 8 and cache.capacity == 20
    keys = np.arange(6 * 4, dtype=np.float32).reshape(6, 1, 4)
    for layer in range(2):
        cache.write(layer, 0, keys, -keys)
    cache.advance([1, 2, 3, 4, 5, 6])
    cache.write(0, 6, keys[:3], keys[:3])  # positions 6..8: beyond 8 allocated -> 16
    assert cache.allocated == 16
    np.testing.assert_array_equal(cache.keys(1, 6)[0], keys[:, 0])  # held positions kept
    np.testing.assert_array_equal(cache.values(1, 6)[0], -keys[:, 0])
    np.testing.assert_array_equal(cache.keys(0, 9)[0, 6:], keys[:3, 0])
    cache.reserve(19)
    assert cache.allocated == 20  # capped at the capacity
    with pytest.raises(ValueError, match="capacity 20"):
        cache.reserve(21)


def test_int8_kv_cache_stores_within_half_a_step_and_saturates(monkeypatch):
    from mllm_deploy.forward import kv_cache

    monkeypatch.setattr(kv_cache, "GROWTH", 4)
    rng = np.random.default_rng(0)
    k_max = np.array([[[1.0, 2.0, 4.0, 8.0]]] * 2, np.float32)  # [layers, kv_heads, head_dim]
    scales = kv_cache.KVScales.from_absmax(k_max, k_max / 2)
    np.testing.assert_allclose(scales.k[0, 0], [1 / 127, 2 / 127, 4 / 127, 8 / 127], rtol=1e-6)
    cache = kv_cache.KVCache(n_layers=2, capacity=10, n_kv_heads=1, head_dim=4, scales=scales)
    keys = (rng.uniform(-1, 1, (6, 1, 4)) * k_max[0, 0]).astype(np.float32)
    keys[0, 0, 0] = 3.0  # beyond the calibrated 1.0: saturates at the last step
    for layer in range(2):
        cache.write(layer, 0, keys, keys / 2)
    cache.advance([1, 2, 3, 4, 5, 6])
    assert cache.k.dtype == np.int8 and cache.allocated == 8  # grown, still int8
    got = cache.keys(1, 6)  # [kv_heads, 6, head_dim], float32
    assert got.dtype == np.float32 and got.shape == (1, 6, 4)
    expected = np.clip(keys[:, 0], -k_max[0, 0], k_max[0, 0])
    assert np.all(np.abs(got[0] - expected) <= scales.k[1, 0] / 2 + 1e-6)
    assert got[0, 0, 0] == pytest.approx(1.0)
    assert cache.stored_values == 2 * 2 * 6 * 4  # layers x (K, V) x positions x channels
    assert cache.saturated_values == 4  # the 3.0 key and its 1.5 value (steps of 1.0 and 0.5) in each layer
    np.testing.assert_allclose(cache.values(0, 6)[0], expected / 2, atol=float(scales.v.max()) / 2 + 1e-6)
    with pytest.raises(ValueError, match="KV scales of shape"):
        kv_cache.KVCache(n_layers=3, capacity=10, n_kv_heads=1, head_dim=4, scales=scales)


def test_attention_window_gives_the_chunk_its_own_rows_exactly():
    """Prefill over an int8 cache: earlier positions come back dequantized, the chunk that has
    just been stored attends its own keys/values at full precision (a float32 cache is a view)."""
    from mllm_deploy.forward import kv_cache

    rng = np.random.default_rng(1)
    scales = kv_cache.KVScales.from_absmax(np.full((1, 2, 4), 2.0, np.float32), np.full((1, 2, 4), 2.0, np.float32))
    for cache in (kv_cache.KVCache(1, 16, 2, 4, scales=scales), kv_cache.KVCache(1, 16, 2, 4)):
        first, second = rng.uniform(-2, 2, (2, 5, 2, 4)).astype(np.float32)
        cache.write(0, 0, first, first)
        cache.advance([1] * 5)
        cache.write(0, 5, second, -second)
        keys, values = cache.attention_window(0, 5, second, -second)
        assert keys.shape == values.shape == (2, 10, 4) and keys.dtype == np.float32
        np.testing.assert_array_equal(keys[:, 5:], second.transpose(1, 0, 2))  # exact
        np.testing.assert_array_equal(values[:, 5:], -second.transpose(1, 0, 2))
        np.testing.assert_array_equal(keys[:, :5], cache.keys(0, 5))  # as held
        tolerance = 0.0 if cache.scales is None else 2.0 / 127 / 2 + 1e-6
        assert np.abs(keys[:, :5] - first.transpose(1, 0, 2)).max() <= tolerance
