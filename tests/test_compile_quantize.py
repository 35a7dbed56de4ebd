"""Quantization arithmetic: round-trip bounds, scale shapes, grids, the linear error bound."""

import numpy as np
import pytest

from mllm_deploy.compile.quantize import (
    ActQuant,
    activation_quant_asymmetric,
    activation_quant_symmetric,
    linear_error_bound,
    quantize_weight,
)

RNG = np.random.default_rng(7)
W = (RNG.standard_normal((48, 32)) * np.linspace(0.01, 2.0, 48)[:, None]).astype(
    np.float32
)  # rows of very different size


def test_per_tensor_weight_round_trip_within_half_step():
    qw = quantize_weight(W, "per-tensor")
    assert qw.q.dtype == np.int8 and qw.q.shape == (48, 32)
    assert qw.scale.shape == () and qw.granularity == "per-tensor"
    assert np.abs(qw.q).max() == 127 and qw.q.min() >= -127
    assert np.isclose(qw.scale, np.abs(W).max() / 127)
    assert np.all(np.abs(qw.dequantize() - W) <= qw.scale / 2 + 1e-7)


def test_per_channel_weight_one_scale_per_output_row():
    qw = quantize_weight(W, "per-channel")
    assert qw.scale.shape == (48,) and qw.granularity == "per-channel"
    assert np.all(np.abs(qw.q).max(axis=1) == 127)  # every row uses its full range
    np.testing.assert_allclose(qw.scale, np.abs(W).max(axis=1) / 127, rtol=1e-6)
    err = np.abs(qw.dequantize() - W)
    assert np.all(err <= qw.scale[:, None] / 2 + 1e-7)
    # small rows are far more precise than with one shared scale
    per_tensor_err = np.abs(quantize_weight(W, "per-tensor").dequantize() - W)
    assert err[:8].max() < per_tensor_err[:8].max() / 4


def test_all_zero_weight_gets_a_finite_scale():
    qw = quantize_weight(np.zeros((4, 4), np.float32), "per-channel")
    assert np.all(np.isfinite(qw.scale)) and np.all(qw.q == 0)


@pytest.mark.parametrize("dtype, zero_point, qmax", [("uint8", 128, 255), ("uint16", 32768, 65535)])
def test_symmetric_activation_grid(dtype, zero_point, qmax):
    act = activation_quant_symmetric(4.0, dtype)
    assert act.zero_point == zero_point and act.qmax == qmax
    assert np.isclose(act.scale, 4.0 / (zero_point - 1), rtol=1e-6)
    lo, hi = act.representable_range
    assert lo <= -4.0 and hi >= 4.0 - 1e-6
    x = np.linspace(-4, 4, 1001, dtype=np.float32)
    assert np.abs(act.fake_quantize(x) - x).max() <= act.scale / 2 + 1e-6
    # beyond the clamp the value saturates: this is the part shadow execution corrects
    np.testing.assert_allclose(act.fake_quantize(np.array([100.0, -100.0], np.float32)), [hi, lo], rtol=1e-6)
    assert act.quantize(x).dtype == act.numpy_dtype


def test_asymmetric_grid_keeps_zero_exact():
    act = activation_quant_asymmetric(-0.3, 6.0, "uint8")
    assert act.fake_quantize(np.zeros(3, np.float32)).tolist() == [0.0, 0.0, 0.0]
    lo, hi = act.representable_range
    assert lo <= -0.3 + act.scale and hi >= 6.0 - act.scale


def test_activation_quant_rejects_bad_parameters():
    with pytest.raises(ValueError):
        ActQuant("int8", 0.1, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ActQuant("uint8", 0.0, 128)
    with pytest.raises(ValueError):
        ActQuant("uint8", 0.1, 300)
    with pytest.raises(ValueError):
        activation_quant_symmetric(float("inf"), "uint8")


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_linear_error_bound_holds_and_is_not_vacuous(granularity, dtype):
    x = RNG.standard_normal((16, 32)).astype(np.float32)
    act = activation_quant_symmetric(float(np.abs(x).max()), dtype)
    qw = quantize_weight(W, granularity)
    y_quant = act.fake_quantize(x) @ qw.dequantize().T  # exact integer product, rescaled
    err = np.abs(y_quant - x @ W.T)
    bound = linear_error_bound(x, qw, act)
    assert np.all(err <= bound * (1 + 1e-4) + 1e-5)
    assert err.max() > bound.max() / 50  # the bound is within a sane factor of reality
