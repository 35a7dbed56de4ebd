"""Shadow outlier correction: exactly (x - clip(x)) @ W.T, hot rows from memory, cold from disk."""

import numpy as np

from mllm_deploy.runtime.shadow import ShadowLinear


def make(tmp_path, hot):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 16)).astype(np.float32)  # [out_total, in]: two outputs of 12
    np.save(tmp_path / "w.npy", np.ascontiguousarray(w.T))
    wt = np.load(tmp_path / "w.npy", mmap_mode="r")  # [in, out_total]
    return w, ShadowLinear.from_weight_t(-1.0, 1.0, wt, np.asarray(hot, np.int64), (12, 12))


def test_correction_is_the_float_product_of_the_clipped_remainder(tmp_path):
    w, shadow = make(tmp_path, hot=[3])
    x = np.zeros((4, 16), np.float32)
    x[0, 3], x[1, 3], x[2, 7], x[3, 0] = 5.0, -2.5, 1.5, 0.9  # 0.9 is inside the grid
    fix = shadow.correction(x)
    assert fix.rows.tolist() == [0, 1, 2]  # row 3 holds no outlier: nothing computed or added there
    a, b = fix.dense(4)
    r = x - np.clip(x, -1.0, 1.0)
    want = r @ w.T  # [4, 24]
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), want, rtol=1e-6, atol=1e-6)
    assert a.shape == b.shape == (4, 12)
    s = shadow.stats
    assert (s.runs, s.values, s.outliers, s.channels, s.rows_from_disk) == (1, 64, 3, 2, 1)  # channel 7 is cold


def test_no_outliers_gives_no_correction_and_reads_nothing(tmp_path):
    _, shadow = make(tmp_path, hot=[])
    assert shadow.correction(np.full((2, 16), 0.5, np.float32)) is None
    assert shadow.stats.outliers == 0 and shadow.stats.rows_from_disk == 0 and shadow.stats.runs == 1


def test_correction_adds_into_the_npu_outputs_rows_with_outliers_only(tmp_path):
    w, shadow = make(tmp_path, hot=[3])
    x = np.zeros((4, 16), np.float32)
    x[2, 3] = 4.0
    npu = [np.ones((4, 12), np.float32), np.full((4, 12), 2.0, np.float32)]
    frozen = npu[1].copy()
    frozen.flags.writeable = False
    a, b = shadow.correction(x).add_to([npu[0], frozen])
    assert a is npu[0]  # added in place
    np.testing.assert_allclose(a[2], 1.0 + 3.0 * w[:12, 3], rtol=1e-6)
    np.testing.assert_array_equal(a[[0, 1, 3]], 1.0)
    np.testing.assert_allclose(b[2], 2.0 + 3.0 * w[12:, 3], rtol=1e-6)
    np.testing.assert_array_equal(frozen, 2.0)  # a read-only output is copied, not written


def test_cold_rows_are_read_from_the_file_not_the_memory_map(tmp_path):
    from mllm_deploy.runtime.shadow import ShadowLinear

    weight_t = np.random.default_rng(1).standard_normal((16, 6)).astype(np.float32)  # [in, out]
    np.save(tmp_path / "w.npy", weight_t)
    mapped = np.load(tmp_path / "w.npy", mmap_mode="r")
    shadow = ShadowLinear.from_weight_t(-1.0, 1.0, mapped, np.array([2], np.int64), (6,))
    assert shadow.cold_rows._sources[0][0]._file is not None  # pread path, not memmap indexing
    x = np.zeros((3, 16), np.float32)
    x[0, 2], x[1, 9], x[2, 9] = 3.0, -4.0, 1.5  # one hot channel (2), one cold (9)
    (got,) = shadow.correction(x).dense(3)
    want = (x - np.clip(x, -1.0, 1.0)) @ weight_t
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert shadow.stats.rows_from_disk == 1 and shadow.stats.outliers == 3
