"""Rotary position embeddings with precomputed cos/sin tables, in both pair conventions."""

from __future__ import annotations

import numpy as np

from mllm_deploy.model.spec import RopeStyle


class RopeTables:
    """cos/sin of `position * theta**(-2i/head_dim)` for i < head_dim/2, grown on demand.

    `adjacent` rotates pairs (2i, 2i+1) (GGUF's permuted Q/K, ggml "normal" rope);
    `half` rotates pairs (i, i + head_dim/2) (Hugging Face checkpoints, NeoX style).
    """

    def __init__(self, head_dim: int, theta: float, style: RopeStyle, n_positions: int = 0):
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if style not in ("adjacent", "half"):
            raise ValueError(f"unknown rope style {style!r}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.style = style
        # Frequencies in float64 so the angles stay exact at long positions.
        self._inv_freq = self.theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        self.cos = np.ones((0, head_dim // 2), np.float32)  # [n_positions, head_dim/2]
        self.sin = np.zeros((0, head_dim // 2), np.float32)  # [n_positions, head_dim/2]
        self.ensure(n_positions)

    def ensure(self, n_positions: int) -> None:
        """Make the tables cover positions `0 .. n_positions-1`."""
        have = self.cos.shape[0]
        if n_positions <= have:
            return
        n_new = max(n_positions, 2 * have, 256)
        angles = np.arange(n_new, dtype=np.float64)[:, None] * self._inv_freq[None, :]
        self.cos = np.cos(angles).astype(np.float32)
        self.sin = np.sin(angles).astype(np.float32)

    def apply(self, x: np.ndarray, start: int) -> np.ndarray:
        """Rotate `x` [T, heads, head_dim] holding positions `start .. start+T-1`; returns a new array."""
        n_tokens = x.shape[0]
        self.ensure(start + n_tokens)
        cos = self.cos[start : start + n_tokens, None, :]  # [T, 1, head_dim/2]
        sin = self.sin[start : start + n_tokens, None, :]
        half = self.head_dim // 2
        out = np.empty_like(x)
        if self.style == "adjacent":
            x0, x1 = x[..., 0::2], x[..., 1::2]  # [T, heads, head_dim/2] each
            out[..., 0::2] = x0 * cos - x1 * sin
            out[..., 1::2] = x0 * sin + x1 * cos
        else:
            x0, x1 = x[..., :half], x[..., half:]
            out[..., :half] = x0 * cos - x1 * sin
            out[..., half:] = x0 * sin + x1 * cos
        return out
