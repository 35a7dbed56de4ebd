"""Shadow outlier execution on the CPU: the float product of the values the NPU clipped.

The NPU graph quantizes its input x on the grid [lo, hi] (QuantizeLinear saturates), so it
computes clip(x, lo, hi) @ W.T. The remainder r = x - clip(x, lo, hi) is non-zero only for the
few outliers; this module computes r @ W.T from the float weight rows of the channels that hold
outliers in this chunk, which the caller adds to the NPU result:

    x [chunk, in] → channels with |x| beyond the grid → r[rows, channels] [m, n] @ W^T[channels] [n, out]

where `rows` are the m token rows that hold any outlier (the correction is added to those rows only).

Hot channels' rows (chosen at calibration) are kept in memory; every other row is read on demand
from the artifacts (`ColdRows`: the model's own blocks, or float32 W^T rows; see
`compile.shadow_store`) and counted.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mllm_deploy.compile.shadow_store import (
    DECODE_U4,
    ColdSource,
    ShadowIndex,
    decode_gathered,
    decode_graph_rows,
    graph_block_arrays,
)
from mllm_deploy.runtime.file_rows import FileRows


@dataclass
class ShadowStats:
    """Counters of one shadowed graph input, summed over runs."""

    runs: int = 0
    values: int = 0  # activation values inspected
    outliers: int = 0  # values beyond the grid (corrected on the CPU)
    channels: int = 0  # (run, channel) pairs multiplied
    rows_from_disk: int = 0  # weight rows read from the memory-mapped file (cold channels)
    cpu_seconds: float = 0.0  # thread CPU time spent in `correction`

    def add(self, other: ShadowStats) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class ShadowLinear:
    """The outlier correction of one graph input (all linears reading it, outputs concatenated)."""

    lo: float  # lower end of the NPU input grid
    hi: float  # upper end
    hot_rows: np.ndarray  # float32 W^T rows of the hot channels [n_hot, out_total], in memory
    hot_channels: np.ndarray  # int64 [n_hot]
    cold_rows: ColdRows  # every W^T row by channel, read on demand
    splits: tuple[int, ...]  # output widths of the graph's outputs, summing to out_total
    stats: ShadowStats = field(default_factory=ShadowStats)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._hot_slot = np.full(self.cold_rows.n_in, -1, np.int64)  # channel -> row of hot_rows, or -1
        self._hot_slot[self.hot_channels] = np.arange(self.hot_channels.size)

    @classmethod
    def from_weight_t(cls, lo: float, hi: float, weight_t: np.ndarray, hot_channels: np.ndarray,
                      splits: tuple[int, ...]) -> ShadowLinear:  # fmt: skip
        """From a float32 W^T [in, out_total] table (memory-mapped: rows read by pread)."""
        cold = ColdRows.of_float(weight_t)
        return cls(lo, hi, cold[hot_channels], hot_channels, cold, splits)

    def correction(self, x: np.ndarray) -> Correction | None:
        """x float32 [chunk, in] → the correction of the token rows that hold outliers, or None
        when no value of x lies beyond the grid."""
        started = time.thread_time()
        # column extremes find the outlier channels in two reductions, without [chunk, in] masks
        channels = np.flatnonzero((x.max(axis=0) > self.hi) | (x.min(axis=0) < self.lo))  # [n]
        if not channels.size:
            self._count(ShadowStats(1, x.size, 0, 0, 0, time.thread_time() - started))
            return None
        xs = x[:, channels]  # [chunk, n]
        r = xs - np.clip(xs, self.lo, self.hi)  # [chunk, n], zero where within the grid
        token_rows = np.flatnonzero(r.any(axis=1))  # [m]: outliers sit in a few tokens for most inputs
        if token_rows.size < x.shape[0]:
            r = r[token_rows]
        slots = self._hot_slot[channels]
        hot = slots >= 0
        rows = np.empty((channels.size, self.hot_rows.shape[1]), np.float32)  # [n, out_total]
        if hot.any():
            rows[hot] = self.hot_rows[slots[hot]]
        disk = int((~hot).sum())
        if disk:
            rows[~hot] = self.cold_rows[channels[~hot]]  # read from the artifact files
        values = r @ rows  # [m, out_total]
        self._count(
            ShadowStats(1, x.size, int(np.count_nonzero(r)), int(channels.size), disk, time.thread_time() - started)
        )
        return Correction(token_rows, np.split(values, np.cumsum(self.splits)[:-1], axis=1))

    def _count(self, stats: ShadowStats) -> None:
        with self._lock:
            self.stats.add(stats)


class ColdRows:
    """W^T rows [in, out_total] of a group of linears by input channel, read from files on demand:
    per linear, float32 rows or the model's column blocks (decoded exactly, `compile.shadow_store`).

    Every read is a pread (`FileRows`): indexing the memory map would keep each page ever read
    resident besides the copy (measured on the default model, every input shadowed, float32 rows:
    cold rows ~200 MB of peak RSS)."""

    def __init__(self, n_in: int, sources: list[tuple[FileRows, ColdSource | None]],
                 graph_sources: dict[int, tuple[FileRows, FileRows]] | None = None):  # fmt: skip
        self.n_in = n_in
        self._sources = sources  # (rows or column blocks, how to decode; None: float32 rows)
        self._graph = graph_sources or {}  # source index -> (scales, offsets) of a "decode-u4" source

    @classmethod
    def of_float(cls, weight_t: np.ndarray) -> ColdRows:
        return cls(weight_t.shape[0], [(FileRows(weight_t), None)])

    @classmethod
    def open(cls, directory: Path, index: ShadowIndex) -> ColdRows:
        sources: list[tuple[FileRows, ColdSource | None]] = []
        graph: dict[int, tuple[FileRows, FileRows]] = {}
        for j, source in enumerate(index.cold):
            if source.type == DECODE_U4:  # a bundle's decode graph blocks (compile.shadow_store)
                codes, scales, offsets = graph_block_arrays(Path(directory) / source.file, source)
                sources.append((FileRows(codes), source))
                graph[j] = (FileRows(scales), FileRows(offsets))
                continue
            table = np.load(Path(directory) / source.file, mmap_mode="r")
            sources.append((FileRows(table), None if source.type == "F32" else source))
        return cls(index.n_in, sources, graph)

    def __getitem__(self, channels: np.ndarray) -> np.ndarray:
        """channels int64 [n] -> float32 [n, out_total]."""
        channels = np.asarray(channels, np.int64)
        parts = []
        for j, (rows, source) in enumerate(self._sources):
            if source is None:
                parts.append(rows[channels])
            elif j in self._graph:  # every output row's codes and scales in one read each (a group: ~1 MB)
                scales, offsets = self._graph[j]
                every = np.arange(rows.shape[0])
                block_ids = np.unique(channels // source.block)
                parts.append(decode_graph_rows(rows[every], scales[every], offsets[block_ids], source.block, channels))
            else:  # each column block read once: [u, out_j, bytes] -> [n, out_j]
                block_ids, slot = np.unique(channels // source.block, return_inverse=True)
                parts.append(decode_gathered(rows[block_ids], source, slot, channels % source.block))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class Correction:
    """What the CPU adds to a graph's outputs: `values[i]` [len(rows), out_i] into rows `rows` of output i."""

    rows: np.ndarray  # int64 [m]: the token rows that hold outliers, ascending
    values: list[np.ndarray]

    def add_to(self, outputs: list[np.ndarray]) -> list[np.ndarray]:
        """outputs [chunk, out_i] with the correction added (in place where the arrays allow)."""
        fixed = []
        for out, value in zip(outputs, self.values, strict=True):
            out = out if out.flags.writeable else out.copy()
            if self.rows.size == out.shape[0]:
                out += value
            else:
                out[self.rows] += value
            fixed.append(out)
        return fixed

    def dense(self, n_rows: int) -> list[np.ndarray]:
        """The correction as full [n_rows, out_i] arrays (zeros in rows without outliers)."""
        return self.add_to([np.zeros((n_rows, v.shape[1]), np.float32) for v in self.values])
