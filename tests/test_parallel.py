"""The build's work split (compile.parallel): parts computed exactly as on one thread, so calibration
gives the same values on any number of cores."""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from mllm_deploy.compile.parallel import SPLIT_MIN_MNK, BuildPool, column_bounds, products_t


def test_map_keeps_order_and_raises_a_parts_error():
    with BuildPool(3) as pool:
        assert pool.map(lambda i: i * i, 7) == [0, 1, 4, 9, 16, 25, 36]
        with pytest.raises(ZeroDivisionError):
            pool.map(lambda i: 1 // (i - 5), 7)


def test_column_bounds_cover_the_columns_and_leave_small_products_whole():
    bounds = column_bounds(16, 1536, 576, 2)
    assert bounds == [(0, 768), (768, 1536)]
    assert column_bounds(16, 192, 576, 2) == [(0, 192)]  # 1.8M multiply-adds: below SPLIT_MIN_MNK
    assert column_bounds(1, 49152, 576, 4)[-1][1] == 49152
    for rows, cols, inputs in ((3, 1000, 1536), (16, 49152, 576), (1, 576, 576)):
        parts = column_bounds(rows, cols, inputs, 4)
        assert [a for a, _ in parts[1:]] == [b for _, b in parts[:-1]] and parts[0][0] == 0 and parts[-1][1] == cols
        assert len(parts) == 1 or all(rows * (b - a) * inputs >= SPLIT_MIN_MNK // 2 for a, b in parts)


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_split_products_equal_the_whole_product_bit_for_bit(workers):
    """The default model's linear shapes (and its head) at the row counts of batched decode."""
    rng = np.random.default_rng(0)
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 576)]
    weights = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    with threadpool_limits(1, "blas"), BuildPool(workers) as pool:
        for rows in (1, 2, 3, 5, 8, 13, 16, 64):
            for w in weights:
                x = rng.standard_normal((rows, w.shape[1])).astype(np.float32)
                (y,) = products_t(pool, x, [w])
                assert np.array_equal(y, x @ w.T), (rows, w.shape)
