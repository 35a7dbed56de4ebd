"""Shadow outlier correction: exactly (x - clip(x)) @ W.T, hot rows from memory, cold from disk."""

import numpy as np

from mllm_deploy.runtime.shadow import ShadowLinear


def make(tmp_path, hot):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 16)).astype(np.float32)  # [out_total, in]: two outputs of 12
    np.save(tmp_path / "w.npy", np.ascontiguousarray(w.T))
    wt = np.load(tmp_path / "w.npy", mmap_mode="r")  # [in, out_total]
    return w, ShadowLinear(-1.0, 1.0, wt, np.asarray(hot, np.int64), (12, 12))


def test_correction_is_the_float_product_of_the_clipped_remainder(tmp_path):
    w, shadow = make(tmp_path, hot=[3])
    x = np.zeros((4, 16), np.float32)
    x[0, 3], x[1, 3], x[2, 7], x[3, 0] = 5.0, -2.5, 1.5, 0.9  # 0.9 is inside the grid
    a, b = shadow.correction(x)
    r = x - np.clip(x, -1.0, 1.0)
    want = r @ w.T  # [4, 24]
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), want, rtol=1e-6, atol=1e-6)
    assert a.shape == b.shape == (4, 12)
    s = shadow.stats
    assert (s.runs, s.values, s.outliers, s.channels, s.rows_from_disk) == (1, 64, 3, 2, 1)  # channel 7 is cold


def test_no_outliers_gives_zeros_and_reads_nothing(tmp_path):
    _, shadow = make(tmp_path, hot=[])
    a, b = shadow.correction(np.full((2, 16), 0.5, np.float32))
    assert not a.any() and not b.any()
    assert shadow.stats.outliers == 0 and shadow.stats.rows_from_disk == 0


def test_cold_rows_are_read_from_the_file_not_the_memory_map(tmp_path):
    from mllm_deploy.runtime.shadow import ShadowLinear

    weight_t = np.random.default_rng(1).standard_normal((16, 6)).astype(np.float32)  # [in, out]
    np.save(tmp_path / "w.npy", weight_t)
    mapped = np.load(tmp_path / "w.npy", mmap_mode="r")
    shadow = ShadowLinear(-1.0, 1.0, mapped, np.array([2], np.int64), (6,))
    assert shadow._cold_rows._file is not None  # pread path, not memmap indexing
    x = np.zeros((3, 16), np.float32)
    x[0, 2], x[1, 9], x[2, 9] = 3.0, -4.0, 1.5  # one hot channel (2), one cold (9)
    (got,) = shadow.correction(x)
    want = (x - np.clip(x, -1.0, 1.0)) @ weight_t
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert shadow.stats.rows_from_disk == 1 and shadow.stats.outliers == 3
