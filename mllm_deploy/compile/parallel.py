"""The build's work split over this machine's cores, with results that do not depend on the split.

Calibration runs numpy's BLAS on one thread (see `compile.build.calibration_stats`) and spreads
independent pieces of work over a few Python threads instead: numpy releases the GIL inside
BLAS and most array loops, so two threads keep two cores busy. Each piece is computed exactly
as it would be on one thread (a product's output columns, one sample's attention, one block of
samples), so the same profile builds the same artifacts on any number of cores.

    with build_pool() as pool:
        run_parts(pool, lambda i: work(i), n_parts)   # part 0 on the calling thread
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def build_workers() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class BuildPool:
    """`workers` threads for independent parts of a computation: the calling thread is one of them."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers if workers is not None else build_workers())
        self._executor = ThreadPoolExecutor(self.workers - 1) if self.workers > 1 else None

    def __enter__(self) -> BuildPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def run_parts(self, work: Callable[[int], None], n_parts: int) -> None:
        """`work(i)` for i in range(n_parts): parts 1.. on the pool's threads, part 0 here; returns
        when all are done (the first exception of any part is raised)."""
        if self._executor is None or n_parts < 2:
            for i in range(n_parts):
                work(i)
            return
        futures = [self._executor.submit(work, i) for i in range(1, n_parts)]
        try:
            work(0)
        finally:
            for future in futures:
                future.result()

    def map(self, work: Callable[[int], T], n_items: int) -> list[T]:
        """[work(i) for i in range(n_items)], the items spread over the threads (results in order)."""
        results: dict[int, T] = {}
        n_parts = min(self.workers, n_items)

        def part(p: int) -> None:
            for i in range(p, n_items, n_parts):
                results[i] = work(i)

        self.run_parts(part, n_parts)
        return [results[i] for i in range(n_items)]


SPLIT_MIN_MNK = 2_000_000
"""A product is split only into parts of at least this many multiply-adds (rows x columns x
inputs): OpenBLAS computes products of up to 100^3 with a small-matrix kernel (SkylakeX and later)
whose sums differ from its regular kernel's in the last bit, so splitting a product near that
size would change its values; above it, a part's columns equal the whole product's bit for bit
(measured for every shape of the default model at 1-19 rows and 2-4 parts: tests/test_parallel.py)."""


def column_bounds(rows: int, n_columns: int, n_inputs: int, n_parts: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) column ranges covering `n_columns`: up to `n_parts`, each a multiple
    of 16 columns (whole SIMD panels of the BLAS kernels) except the last, and none smaller than
    SPLIT_MIN_MNK multiply-adds (one range when the product is that small)."""
    most = max(1, rows * n_columns * n_inputs // SPLIT_MIN_MNK)
    parts = max(1, min(n_parts, most))
    step = -(-n_columns // (parts * 16)) * 16
    return [(a, min(a + step, n_columns)) for a in range(0, n_columns, step)]


def products_t(pool: BuildPool, x: np.ndarray, weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """[x @ w.T for w in weights] (x [T, in], each w [out, in]) with the output columns of each
    large product split over the pool's threads: each element is the same dot product one thread
    computes, so the values equal `x @ w.T` bit for bit (see SPLIT_MIN_MNK)."""
    outs = [np.empty((x.shape[0], w.shape[0]), np.float32) for w in weights]
    bounds = [column_bounds(x.shape[0], w.shape[0], w.shape[1], pool.workers) for w in weights]
    n_parts = max(len(b) for b in bounds)

    def part(i: int) -> None:
        for w, out, cols in zip(weights, outs, bounds, strict=True):
            if i < len(cols):
                a, b = cols[i]
                np.matmul(x, w[a:b].T, out=out[:, a:b])

    pool.run_parts(part, n_parts)
    return outs
