"""Reading rows of a file-backed float32 table with pread, so only the rows read use memory."""

from __future__ import annotations

import os

import numpy as np


class FileRows:
    """Rows of a float32 table [rows, width] (the embedding, shadow weight rows) without paging
    the whole table in.

    Indexing a memory-mapped table with a prompt's ids faults in far more than the rows (read
    at 1,024 ids of real text, measured: 90 of the 113 MB table became resident, with or without
    MADV_RANDOM), so rows of a file-backed table are read with pread; an in-memory table is
    indexed directly."""

    def __init__(self, table: np.ndarray):
        self.table = table
        self.shape = table.shape
        self._file = None
        filename = getattr(table, "filename", None)
        if isinstance(table, np.memmap) and filename and table.flags["C_CONTIGUOUS"] and table.dtype == np.float32:
            self._file = open(filename, "rb")  # noqa: SIM115 - held for the reader's lifetime
            self._offset = int(table.offset)
            self._row_bytes = table.shape[1] * 4

    def __getitem__(self, ids) -> np.ndarray:
        """ids (int or int array [T]) -> float32 [width] or [T, width], a fresh array."""
        if self._file is None:
            return np.array(self.table[ids], dtype=np.float32)
        scalar = np.ndim(ids) == 0
        flat = np.atleast_1d(np.asarray(ids, np.int64))
        out = np.empty((flat.size, self.shape[1]), np.float32)
        fd = self._file.fileno()
        for i, row in enumerate(flat.tolist()):
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {row} outside the table of {self.shape[0]} rows")
            out[i] = np.frombuffer(os.pread(fd, self._row_bytes, self._offset + row * self._row_bytes), np.float32)
        return out[0] if scalar else out
