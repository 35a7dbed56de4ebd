"""Quantization arithmetic for the NPU graphs: pure numpy, no ONNX.

Weights: symmetric INT8 in [-127, 127] with zero point 0, one scale per tensor or per output
channel. -128 is never used, so the grid is symmetric and the same int8 tensor is valid for
QNN HTP (which requires symmetric int8 weights, zero point 0) and for onnxruntime's CPU
integer kernels (MLAS u8s8 / s8s8 GEMMs).

Activations: per-tensor uint8 or uint16 with a scale and zero point. The default is the
*symmetric* grid: zero point at the middle of the unsigned range (128 or 32768), scale =
clamp / 127 (or / 32767). Why symmetric:

- The clamp range comes from calibration as a percentile of |x| (shadow outlier execution
  splits x into clamp(x) and the values beyond ±clamp), so a grid centred on zero covers
  exactly the clamp range and the CPU-side outlier test is just |x| > clamp.
- Speed is the same as asymmetric on both backends: onnxruntime's MLAS kernels handle an
  activation zero point with one row-sum correction per output (O(chunk·out), negligible next
  to the O(chunk·in·out) GEMM), and HTP natively runs uint8/uint16 activations with an offset
  (its preferred activation encoding). What costs speed is the *weight* zero point, which is
  always 0 here.
- The linear inputs of a Llama block (RMSNorm outputs, attention outputs, silu(gate)·up) are
  signed and roughly centred on zero, so an asymmetric grid would gain almost nothing.

`activation_quant_asymmetric` exists for ranges that are genuinely one-sided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ActDtype = Literal["uint8", "uint16"]
WeightGranularity = Literal["per-tensor", "per-channel"]

INT8_WEIGHT_MAX = 127
_QMAX = {"uint8": 255, "uint16": 65535}
_NUMPY_DTYPE: dict[str, type[np.uint8 | np.uint16]] = {"uint8": np.uint8, "uint16": np.uint16}
_TINY = np.float32(1e-12)  # floor on scales so an all-zero tensor still has a valid grid


@dataclass(frozen=True)
class QuantizedWeight:
    """A symmetric INT8 weight in the (out, in) layout: W ≈ q * scale[:, None]."""

    q: np.ndarray  # int8 [out, in]
    scale: np.ndarray  # float32 [] (per-tensor) or [out] (per-channel)

    @property
    def granularity(self) -> WeightGranularity:
        return "per-tensor" if self.scale.ndim == 0 else "per-channel"

    def dequantize(self) -> np.ndarray:
        """float32 [out, in]."""
        scale = self.scale if self.scale.ndim == 0 else self.scale[:, None]
        out: np.ndarray = self.q.astype(np.float32) * scale
        return out


@dataclass(frozen=True)
class ActQuant:
    """Per-tensor activation quantization: x ≈ (q - zero_point) * scale, q in the dtype's range."""

    dtype: ActDtype
    scale: float
    zero_point: int

    def __post_init__(self) -> None:
        if self.dtype not in _QMAX:
            raise ValueError(f"activation dtype must be uint8 or uint16, got {self.dtype!r}")
        if not (self.scale > 0 and np.isfinite(self.scale)):
            raise ValueError(f"activation scale must be positive and finite, got {self.scale!r}")
        if not 0 <= self.zero_point <= _QMAX[self.dtype]:
            raise ValueError(f"zero point {self.zero_point} outside the {self.dtype} range")

    @property
    def qmax(self) -> int:
        return _QMAX[self.dtype]

    @property
    def numpy_dtype(self) -> type[np.uint8 | np.uint16]:
        return _NUMPY_DTYPE[self.dtype]

    @property
    def representable_range(self) -> tuple[float, float]:
        """Smallest and largest float value the grid holds (the clamp range)."""
        return (-self.zero_point * self.scale, (self.qmax - self.zero_point) * self.scale)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Like ONNX QuantizeLinear: round half to even, saturate."""
        q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(self.scale)) + self.zero_point
        out: np.ndarray = np.clip(q, 0, self.qmax).astype(self.numpy_dtype)
        return out

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        out: np.ndarray = (q.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)
        return out

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        """dequantize(quantize(x)): what the NPU sees of x (clamped and rounded)."""
        return self.dequantize(self.quantize(x))


def quantize_weight(w: np.ndarray, granularity: WeightGranularity) -> QuantizedWeight:
    """Symmetric INT8 quantization of a float (out, in) weight.

    Per-tensor: one scale = max|W| / 127. Per-channel: scale[o] = max|W[o, :]| / 127.
    Rounding error per element is at most scale / 2.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {w.shape}")
    if granularity == "per-tensor":
        scale = np.maximum(np.abs(w).max(), _TINY) / np.float32(INT8_WEIGHT_MAX)  # []
        q = np.rint(w / scale)
    elif granularity == "per-channel":
        scale = np.maximum(np.abs(w).max(axis=1), _TINY) / np.float32(INT8_WEIGHT_MAX)  # [out]
        q = np.rint(w / scale[:, None])
    else:
        raise ValueError(f"unknown weight granularity {granularity!r}")
    q = np.clip(q, -INT8_WEIGHT_MAX, INT8_WEIGHT_MAX).astype(np.int8)
    return QuantizedWeight(q=q, scale=np.asarray(scale, dtype=np.float32))


def activation_quant_symmetric(clamp: float, dtype: ActDtype) -> ActQuant:
    """Grid covering [-clamp, clamp] (exactly, up to one step at the top) with the zero point
    in the middle of the unsigned range: 128 for uint8, 32768 for uint16."""
    if not (clamp > 0 and np.isfinite(clamp)):
        raise ValueError(f"clamp must be positive and finite, got {clamp!r}")
    half = (_QMAX[dtype] + 1) // 2  # 128 or 32768
    return ActQuant(dtype=dtype, scale=float(np.float32(clamp / (half - 1))), zero_point=half)


def activation_quant_asymmetric(lo: float, hi: float, dtype: ActDtype) -> ActQuant:
    """Grid covering [lo, hi] (widened to include 0, so zero is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (hi > lo and np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"empty or infinite range [{lo}, {hi}]")
    qmax = _QMAX[dtype]
    scale = float(np.float32((hi - lo) / qmax))
    zero_point = int(np.clip(np.rint(-lo / scale), 0, qmax))
    return ActQuant(dtype=dtype, scale=scale, zero_point=zero_point)


def linear_error_bound(x: np.ndarray, weight: QuantizedWeight, act: ActQuant) -> np.ndarray:
    """Worst-case |x_q @ W_q.T - x @ W.T| per output element for x inside the clamp range,
    from the rounding steps alone (no accumulation error, which is exact in int32):

        |Δy[t, o]| ≤ Σ_i |x[t,i]| · s_w[o]/2 + Σ_i |W[o,i]| · s_x/2 + Σ_i s_x/2 · s_w[o]/2

    x: float32 [tokens, in] → bound float32 [tokens, out]. Values of x beyond the clamp range
    are not covered (that error is what shadow outlier execution corrects).
    """
    w_float = weight.dequantize()  # [out, in]
    s_w = weight.scale if weight.scale.ndim == 1 else np.full(w_float.shape[0], weight.scale)  # [out]
    s_x = np.float32(act.scale)
    n_in = w_float.shape[1]
    x_abs_sum = np.abs(x).sum(axis=1, keepdims=True)  # [tokens, 1]
    w_abs_sum = np.abs(w_float).sum(axis=1)  # [out]
    bound: np.ndarray = (x_abs_sum * s_w / 2 + w_abs_sum * s_x / 2 + n_in * s_x * s_w / 4).astype(np.float32)
    return bound
