"""Rows of a file-backed float32 table read with one preadv per run of consecutive rows."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mllm_deploy.runtime.file_rows import FileRows


@pytest.fixture
def mapped(tmp_path):
    table = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    np.save(tmp_path / "t.npy", table)
    return table, np.load(tmp_path / "t.npy", mmap_mode="r")


@pytest.mark.parametrize("ids", [[4, 5, 6, 7], [0, 1, 9, 10, 11, 39], [12, 11, 10], [5, 5, 6], list(range(40))])
def test_runs_of_consecutive_rows_read_like_indexing(mapped, ids):
    table, memmap = mapped
    rows = FileRows(memmap)
    assert rows._file is not None  # really the file path, not the array
    out = rows[np.array(ids)]
    assert out.shape == (len(ids), 6) and out.dtype == np.float32
    np.testing.assert_array_equal(out, table[ids])


def test_no_rows_and_rows_outside_the_table(mapped):
    _, memmap = mapped
    rows = FileRows(memmap)
    assert rows[np.array([], np.int64)].shape == (0, 6)
    with pytest.raises(IndexError, match="row 40 outside the table of 40 rows"):
        rows[np.array([3, 40])]
    with pytest.raises(IndexError, match="row -1 outside"):
        rows[np.array([-1])]


def test_a_truncated_file_is_a_named_error_not_garbage(mapped, tmp_path):
    _, memmap = mapped
    rows = FileRows(memmap)
    os.truncate(tmp_path / "t.npy", memmap.offset + 30 * 6 * 4)  # rows 30.. are gone
    np.testing.assert_array_equal(rows[np.array([2, 3])][:, 0], [12.0, 18.0])
    with pytest.raises(OSError, match=r"t\.npy: short read of rows 29\.\.31"):
        rows[np.array([29, 30, 31])]


def test_without_preadv_the_pread_fallback_reads_the_same_rows(mapped, monkeypatch, tmp_path):
    from mllm_deploy.runtime import file_rows

    table, memmap = mapped
    monkeypatch.setattr(file_rows, "_HAS_PREADV", False)
    rows = FileRows(memmap)
    np.testing.assert_array_equal(rows[np.array([0, 1, 9, 10, 39])], table[[0, 1, 9, 10, 39]])
    os.truncate(tmp_path / "t.npy", memmap.offset + 30 * 6 * 4)
    with pytest.raises(OSError, match=r"short read of rows 29\.\.31"):
        rows[np.array([29, 30, 31])]
