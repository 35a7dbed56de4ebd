"""Shadow rows on disk (issue 16): hot channels' float rows, every other row in the model's own
blocks, read back bit for bit equal to the float32 rows the shadow path multiplied before."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mllm_deploy.compile.shadow_store import read_index, write_shadow_rows
from mllm_deploy.runtime.shadow import ColdRows, ShadowLinear

RNG = np.random.default_rng(7)


def quantized(shape: tuple[int, int], qtype: str) -> tuple[np.ndarray, np.ndarray, gguf.GGMLQuantizationType]:
    """(float32 W as the model loader dequantizes it, the raw GGUF rows, the type)."""
    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize((RNG.standard_normal(shape) * 0.05).astype(np.float32), t)
    return gguf.quants.dequantize(raw, t).astype(np.float32), raw, t


@pytest.mark.parametrize("qtypes", [("Q4_1", "Q4_1"), ("Q8_0", "Q4_0"), ("Q5_0",)])
def test_cold_rows_decode_to_the_float_rows_bit_for_bit_in_a_fraction_of_the_bytes(tmp_path, qtypes):
    sources = [quantized((48, 64), t) for t in qtypes]
    weight_t = np.ascontiguousarray(np.concatenate([w for w, _, _ in sources]).T)  # [in 64, out_total]
    hot = np.array([5, 40], np.int64)
    write_shadow_rows(tmp_path, 3, "gate_up", weight_t, hot, sources)
    index = read_index(tmp_path, 3, "gate_up")
    assert index.hot_channels == [5, 40] and [c.type for c in index.cold] == list(qtypes)
    hot_rows = np.load(tmp_path / "shadow" / index.hot_file)
    assert hot_rows.shape == (2, weight_t.shape[1]) and np.array_equal(hot_rows, weight_t[hot])
    cold = ColdRows.open(tmp_path / "shadow", index)
    channels = np.array([0, 5, 17, 31, 32, 63], np.int64)  # both nibbles, both blocks of a row
    assert np.array_equal(cold[channels], weight_t[channels])
    assert np.array_equal(cold[np.arange(64)], weight_t)
    stored = sum((tmp_path / "shadow" / c.file).stat().st_size for c in index.cold)
    assert stored < weight_t.nbytes * 0.4  # vs. float32 rows (plus a 128-byte .npy header each)


def test_a_source_without_blocks_keeps_float32_rows(tmp_path):
    w = RNG.standard_normal((16, 32)).astype(np.float32)
    write_shadow_rows(tmp_path, 0, "down", np.ascontiguousarray(w.T), np.array([], np.int64), [(w, None, None)])
    index = read_index(tmp_path, 0, "down")
    assert index.cold[0].type == "F32" and index.hot_channels == []
    assert np.array_equal(ColdRows.open(tmp_path / "shadow", index)[np.array([3, 9])], w.T[[3, 9]])


def test_the_correction_from_stored_rows_equals_the_float_product(tmp_path):
    sources = [quantized((32, 64), "Q4_1"), quantized((32, 64), "Q4_1")]
    weight_t = np.ascontiguousarray(np.concatenate([w for w, _, _ in sources]).T)  # [64, 64]
    hot = np.array([2], np.int64)
    write_shadow_rows(tmp_path, 0, "gate_up", weight_t, hot, sources)
    index = read_index(tmp_path, 0, "gate_up")
    stored = ShadowLinear(-1.0, 1.0, np.load(tmp_path / "shadow" / index.hot_file), hot,
                          ColdRows.open(tmp_path / "shadow", index), (32, 32))  # fmt: skip
    dense = ShadowLinear.from_weight_t(-1.0, 1.0, weight_t, hot, (32, 32))
    x = np.zeros((4, 64), np.float32)
    x[0, 2], x[1, 9], x[3, 33] = 3.0, -4.0, 2.5  # one hot channel, two cold ones
    a, b = stored.correction(x), dense.correction(x)
    assert a.rows.tolist() == b.rows.tolist() == [0, 1, 3]
    for got, want in zip(a.values, b.values, strict=True):
        assert np.array_equal(got, want)
    assert stored.stats.rows_from_disk == 2


def test_column_blocks_are_read_by_pread_in_their_own_dtype(tmp_path):
    from mllm_deploy.runtime.file_rows import FileRows

    table = RNG.integers(0, 256, (10, 4, 20), dtype=np.uint8)  # [in/block, out, block bytes]
    np.save(tmp_path / "c.npy", table)
    rows = FileRows(np.load(tmp_path / "c.npy", mmap_mode="r"))
    assert rows._file is not None  # the pread path, not memory-map indexing
    got = rows[np.array([1, 2, 7])]
    assert got.dtype == np.uint8 and got.shape == (3, 4, 20) and np.array_equal(got, table[[1, 2, 7]])
