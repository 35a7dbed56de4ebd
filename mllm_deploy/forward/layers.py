"""The pieces of one Llama block in numpy float32: RMSNorm, linears, attention, SwiGLU.

A block runs as three steps so that the linears can later be swapped for static-shape NPU
graphs while attention (dynamic: a chunk against every earlier token) stays on the CPU:

    qkv_step        x -> norm -> q, k, v           (linears)
    attention_step  rope, KV-cache write, causal attention over the cache   (CPU, float)
    out_mlp_step    attn -> wo + residual -> norm -> SwiGLU MLP + residual  (linears)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mllm_deploy.forward.attention import chunk_attention
from mllm_deploy.model.spec import LayerWeights


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [T, hidden] * weight / sqrt(mean(x^2) + eps)."""
    mean_sq = np.einsum("th,th->t", x, x)[:, None] / np.float32(x.shape[1])  # [T, 1]
    out = np.multiply(x, 1.0 / np.sqrt(mean_sq + np.float32(eps)))  # [T, hidden]
    out *= weight  # in place: a second [T, hidden] temporary cost 6x the arithmetic (page faults)
    return out


def silu_mul_(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gate <- silu(gate) * up, in place (no temporaries beyond one [T, ffn] buffer)."""
    denom = np.negative(gate)
    np.exp(denom, out=denom)
    denom += 1.0
    gate /= denom
    gate *= up
    return gate


class BlockLinears(Protocol):
    """The linear layers of one block; the float version is below, NPU graphs come later."""

    def qkv(self, x_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x_norm [T, hidden] -> q [T, q_dim], k [T, kv_dim], v [T, kv_dim] (biases included)."""

    def attn_output(self, attn: np.ndarray) -> np.ndarray:
        """attn [T, q_dim] -> [T, hidden]."""

    def mlp(self, x_norm: np.ndarray) -> np.ndarray:
        """x_norm [T, hidden] -> down(silu(gate(x)) * up(x)) [T, hidden]."""


class FloatBlockLinears:
    """float32 numpy matmuls against the (out, in) weights: `y = x @ W.T`."""

    def __init__(self, layer: LayerWeights):
        self.w = layer

    def qkv(self, x_norm):
        w = self.w
        q = x_norm @ w.wq.T  # [T, q_dim]
        k = x_norm @ w.wk.T  # [T, kv_dim]
        v = x_norm @ w.wv.T  # [T, kv_dim]
        if w.bq is not None:
            q += w.bq
        if w.bk is not None:
            k += w.bk
        if w.bv is not None:
            v += w.bv
        return q, k, v

    def attn_output(self, attn):
        return attn @ self.w.wo.T

    def mlp(self, x_norm):
        gate = x_norm @ self.w.w_gate.T  # [T, ffn]
        up = x_norm @ self.w.w_up.T  # [T, ffn]
        return silu_mul_(gate, up) @ self.w.w_down.T  # [T, hidden]


@dataclass(frozen=True)
class ChunkSpan:
    """Where a chunk sits: its first position, its real tokens and its padded length."""

    start: int  # position of the chunk's first token (= tokens already in the cache)
    n_real: int  # real tokens; rows n_real.. are padding
    n_rows: int  # rows actually computed (n_real, or chunk_size when padded)

    @property
    def end(self) -> int:
        """One past the last real position."""
        return self.start + self.n_real


def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, n_kv_heads: int) -> np.ndarray:
    """Grouped-query attention of a chunk over every earlier token and causally within itself.

    q: [T, n_heads, head_dim], already rotated, row t at position `start + t`.
    keys, values: [n_kv_heads, L, head_dim] (the KV cache's layout), positions 0 .. L-1
    (L = start + real tokens).
    Query t sees keys j <= start + t. Padding rows (start + t >= L) see every real key and
    are discarded by the caller; padding keys are never in `keys`.
    Returns [T, n_heads * head_dim]. The kernel is `forward.attention.chunk_attention`
    (onnxruntime's GroupQueryAttention on as many threads as BLAS may use).
    """
    return chunk_attention(q, keys, values, start, n_kv_heads)
