"""Shadow outlier execution on the CPU: the float product of the values the NPU clipped.

The NPU graph quantizes its input x on the grid [lo, hi] (QuantizeLinear saturates), so it
computes clip(x, lo, hi) @ W.T. The remainder r = x - clip(x, lo, hi) is non-zero only for the
few outliers; this module computes r @ W.T from the float weight rows of the channels that hold
outliers in this chunk, which the caller adds to the NPU result:

    x [chunk, in] → channels with |x| beyond the grid → r[:, channels] [chunk, n] @ W^T[channels] [n, out]

Hot channels' rows (chosen at calibration) are kept in memory; every other row is read on demand
from the memory-mapped float32 W^T [in, out] stored with the artifacts, and counted.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

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
    weight_t: np.ndarray  # float32 W^T [in, out_total], memory-mapped (read on demand)
    hot_channels: np.ndarray  # int64 [n_hot]
    splits: tuple[int, ...]  # output widths of the graph's outputs, summing to out_total
    stats: ShadowStats = field(default_factory=ShadowStats)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.hot_rows = np.ascontiguousarray(self.weight_t[self.hot_channels])  # [n_hot, out_total] in memory
        self._hot_index = {int(c): i for i, c in enumerate(self.hot_channels)}
        # cold rows by pread: indexing the memory map would keep every page ever read resident
        # (measured: ~200 MB of peak RSS on the default model with every input shadowed)
        self._cold_rows = FileRows(self.weight_t)

    def correction(self, x: np.ndarray) -> list[np.ndarray]:
        """x float32 [chunk, in] → corrections [chunk, out_i] for each output (zeros if no outlier)."""
        started = time.thread_time()
        beyond = (x > self.hi) | (x < self.lo)  # [chunk, in]
        n_out = int(np.count_nonzero(beyond))
        out = np.zeros((x.shape[0], self.weight_t.shape[1]), np.float32)  # [chunk, out_total]
        disk = 0
        channels = np.flatnonzero(beyond.any(axis=0))  # [n]
        if channels.size:
            xs = x[:, channels]  # [chunk, n]
            r = xs - np.clip(xs, self.lo, self.hi)  # [chunk, n], zero where within the grid
            hot = np.array([c in self._hot_index for c in channels.tolist()], bool)
            rows = np.empty((channels.size, self.weight_t.shape[1]), np.float32)  # [n, out_total]
            if hot.any():
                rows[hot] = self.hot_rows[[self._hot_index[c] for c in channels[hot].tolist()]]
            if (~hot).any():
                rows[~hot] = self._cold_rows[channels[~hot]]  # read from the artifact file
                disk = int((~hot).sum())
            np.matmul(r, rows, out=out)
        stats = ShadowStats(1, x.size, n_out, int(channels.size), disk, time.thread_time() - started)
        with self._lock:
            self.stats.add(stats)
        return np.split(out, np.cumsum(self.splits)[:-1], axis=1)
