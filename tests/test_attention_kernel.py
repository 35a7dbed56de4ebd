"""forward.attention.chunk_attention against a plain float64 reference (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest

from mllm_deploy.forward import attention
from mllm_deploy.forward.attention import chunk_attention


def reference(q, keys, values, start, n_kv_heads, window=None):
    """Row t at position start + t sees keys j < L with j <= start + t and j > start + t - window."""
    n_rows, n_heads, head_dim = q.shape
    n_keys = keys.shape[1]
    group = n_heads // n_kv_heads
    out = np.zeros((n_rows, n_heads, head_dim))
    for t in range(n_rows):
        visible = np.arange(n_keys) <= start + t
        if window is not None:
            visible &= np.arange(n_keys) > start + t - window
        for h in range(n_heads):
            if not visible.any():
                continue
            k, v = keys[h // group].astype(np.float64), values[h // group].astype(np.float64)
            scores = np.where(visible, k @ q[t, h] / np.sqrt(head_dim), -np.inf)
            weights = np.exp(scores - scores.max())
            out[t, h] = weights / weights.sum() @ v
    return out.reshape(n_rows, n_heads * head_dim)


CASES = [  # rows, start, real rows, heads, kv heads, head_dim
    (200, 0, 200, 4, 2, 16),  # first chunk: the causal square only, two row blocks
    (130, 300, 130, 6, 2, 64),  # past + own rows
    (150, 40, 61, 4, 1, 8),  # a padded chunk: rows 61.. see every real key
    (20, 10, 20, 2, 2, 256),  # head_dim 256 (Gemma 3)
    (9, 5, 7, 4, 2, 4),  # head_dim 4: the numpy version
    (10, 30, 8, 4, 2, 16),  # few rows: the numpy version
]


@pytest.mark.parametrize(("rows", "start", "real", "heads", "kv_heads", "dim"), CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_the_float64_reference(rows, start, real, heads, kv_heads, dim, threads):
    rng = np.random.default_rng(rows + start)
    q = rng.standard_normal((rows, heads, dim), dtype=np.float32)
    keys = 2 * rng.standard_normal((kv_heads, start + real, dim), dtype=np.float32)
    values = rng.standard_normal((kv_heads, start + real, dim), dtype=np.float32)
    out = chunk_attention(q, keys, values, start, kv_heads, threads=threads)
    assert out.shape == (rows, heads * dim) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference(q, keys, values, start, kv_heads), rtol=0, atol=2e-5)


def test_reads_the_cache_layout_in_place_strided():
    """A layer of the KV cache is a strided view [kv_heads, :L, head_dim] of a larger buffer."""
    rng = np.random.default_rng(3)
    buffer = rng.standard_normal((2, 2, 512, 16), dtype=np.float32)  # [k/v, kv_heads, capacity, head_dim]
    keys, values = buffer[0, :, :300], buffer[1, :, :300]
    q = rng.standard_normal((100, 4, 16), dtype=np.float32)
    out = chunk_attention(q, keys, values, 200, 2)
    np.testing.assert_allclose(out, reference(q, keys, values, 200, 2), rtol=0, atol=2e-5)


@pytest.mark.parametrize("dim", [16, 4])  # onnxruntime's kernel and the numpy version
@pytest.mark.parametrize(("start", "real", "window"), [(0, 40, 5), (50, 40, 1), (50, 40, 33), (50, 17, 5)])
def test_sliding_window(dim, start, real, window):
    rng = np.random.default_rng(window)
    q = rng.standard_normal((40, 4, dim), dtype=np.float32)
    keys = rng.standard_normal((2, start + real, dim), dtype=np.float32)
    values = rng.standard_normal((2, start + real, dim), dtype=np.float32)
    out = chunk_attention(q, keys, values, start, 2, window=window)
    expected = reference(q, keys, values, start, 2, window)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)  # padding rows too: zeros where nothing is seen


def test_row_block_size_does_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((96, 4, 16), dtype=np.float32)
    keys = rng.standard_normal((2, 150, 16), dtype=np.float32)
    values = rng.standard_normal((2, 150, 16), dtype=np.float32)
    results = []
    for block in (7, 32, 96):
        monkeypatch.setattr(attention, "ROW_BLOCK", block)
        results.append(chunk_attention(q, keys, values, 60, 2))  # 90 real rows, 6 padding
    np.testing.assert_allclose(results[0], results[2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(results[1], results[2], rtol=0, atol=1e-6)


def test_refuses_inconsistent_shapes():
    q = np.zeros((4, 4, 16), np.float32)
    with pytest.raises(ValueError, match="KV heads"):
        chunk_attention(q, np.zeros((2, 6, 16), np.float32), np.zeros((2, 6, 8), np.float32), 2, 2)
    with pytest.raises(ValueError, match="real rows"):
        chunk_attention(q, np.zeros((2, 9, 16), np.float32), np.zeros((2, 9, 16), np.float32), 2, 2)
