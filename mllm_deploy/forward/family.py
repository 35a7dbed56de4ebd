"""The pieces other architectures add to the Llama block (model.architectures), in numpy float32:
GeGLU, per-head RMSNorm of q and k (QK-norm), and sliding-window attention for "local" layers.

Gemma's RMSNorm multiplies by (1 + weight); GGUF files store the weight already shifted by one
(llama.cpp's converter adds it), so `layers.rms_norm` with the stored weight is that norm.
"""

from __future__ import annotations

import numpy as np

from mllm_deploy.forward.layers import FloatBlockLinears, rms_norm
from mllm_deploy.model.spec import LayerWeights

_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))


def gelu_tanh_mul_(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gate <- gelu_tanh(gate) * up, in place: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))."""
    inner = gate * gate
    inner *= np.float32(0.044715) * gate
    inner += gate
    inner *= _SQRT_2_OVER_PI
    np.tanh(inner, out=inner)
    inner += 1.0
    gate *= np.float32(0.5)
    gate *= inner
    gate *= up
    return gate


def head_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [T, heads, head_dim] normalised over head_dim per (token, head), times weight [head_dim]."""
    n_rows, n_heads, head_dim = x.shape
    return rms_norm(x.reshape(n_rows * n_heads, head_dim), weight, eps).reshape(n_rows, n_heads, head_dim)


def sliding_window_attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, n_kv_heads: int, window: int
) -> np.ndarray:
    """Causal grouped-query attention where query position p sees keys j with p - window < j <= p.

    q [T, n_heads, head_dim] rotated and already scaled (the caller's attention scale times
    sqrt(head_dim): this divides by sqrt(head_dim) as `layers.causal_attention` does); keys,
    values [n_kv_heads, L, head_dim] at positions 0..L-1. Returns [T, n_heads * head_dim].
    """
    n_rows, n_heads, head_dim = q.shape
    first = max(0, start - window + 1)  # no query of the chunk sees a key before this
    keys, values = keys[:, first:], values[:, first:]
    n_keys = keys.shape[1]
    group = n_heads // n_kv_heads
    q_by_head = (q * np.float32(1.0 / np.sqrt(head_dim))).reshape(n_rows, n_kv_heads, group, head_dim)
    q_grouped = q_by_head.transpose(1, 2, 0, 3).reshape(n_kv_heads, group * n_rows, head_dim)
    scores = q_grouped @ keys.transpose(0, 2, 1)  # [kv_heads, group*T, n_keys]
    query_pos = start + np.arange(n_rows)[:, None]  # [T, 1]
    key_pos = first + np.arange(n_keys)[None, :]  # [1, n_keys]
    hidden = (key_pos > query_pos) | (key_pos <= query_pos - window)  # [T, n_keys]
    grid = scores.reshape(n_kv_heads, group, n_rows, n_keys)
    grid[..., hidden] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = (scores @ values).reshape(n_kv_heads, group, n_rows, head_dim).transpose(2, 0, 1, 3)
    return out.reshape(n_rows, n_heads * head_dim)


class GegluBlockLinears(FloatBlockLinears):
    """FloatBlockLinears whose MLP is GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def mlp(self, x_norm):
        gate = x_norm @ self.w.w_gate.T  # [T, ffn]
        up = x_norm @ self.w.w_up.T  # [T, ffn]
        return gelu_tanh_mul_(gate, up) @ self.w.w_down.T  # [T, hidden]


def float_block_linears(layer: LayerWeights, activation: str) -> FloatBlockLinears:
    """The float linears of one block for the spec's MLP activation."""
    return GegluBlockLinears(layer) if activation == "gelu_tanh" else FloatBlockLinears(layer)
