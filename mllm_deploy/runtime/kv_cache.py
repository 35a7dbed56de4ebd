"""float32 key/value cache of one conversation, grown on demand.

Prefill writes a chunk's keys and values layer by layer, then commits the chunk's real
tokens with `advance`; decode does the same one token at a time. Padding of a chunk is
never written, and `length` counts real tokens only. `truncate` rolls back (multi-turn
prefix reuse, cancel).

Memory grows with use: `capacity` is the most positions the cache may hold, but the buffers
cover only what has been reserved (`reserve`, rounded up to GROWTH positions) and are
reallocated, keeping the held positions, when a prefill or decode step needs more. Untouched
pages of a zeroed buffer cost no memory, but onnxruntime's GroupQueryAttention writes its whole
bound K/V buffer once: a 4,096-position cache bound in full cost 177 MB of RSS for a one-line
question (measured on the default model).

Layout per layer is heads-major, `[kv_heads, capacity, head_dim]`: one head's keys are a
contiguous `[positions, head_dim]` matrix (what BLAS and onnxruntime's GroupQueryAttention read
in place), so neither prefill attention nor the decode graph copies the cache.
"""

from __future__ import annotations

import numpy as np


GROWTH = 64
"""Buffers grow in multiples of this many positions (a turn reserves its prompt plus
`max_new_tokens` up front, so growth is rare and can be tight)."""


class KVCache:
    """K and V of every layer, `[layers, kv_heads, capacity, head_dim]` float32, plus the token ids held."""

    def __init__(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int):
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be >= 1, got {capacity}")
        self.n_layers = n_layers
        self.capacity = capacity
        # np.zeros maps untouched pages lazily, so RSS grows with the tokens actually held.
        first = min(capacity, GROWTH)
        self.k = np.zeros((n_layers, n_kv_heads, first, head_dim), np.float32)
        self.v = np.zeros((n_layers, n_kv_heads, first, head_dim), np.float32)
        self.token_ids: list[int] = []  # the token at each committed position

    @property
    def allocated(self) -> int:
        """Positions the buffers cover now (<= capacity)."""
        return self.k.shape[2]

    def reserve(self, n_positions: int) -> None:
        """Make the buffers cover positions `0 .. n_positions-1` (new arrays, held positions
        copied; views taken before are stale). Beyond `capacity` is an error."""
        if n_positions <= self.allocated:
            return
        if n_positions > self.capacity:
            raise ValueError(f"KV cache full: {n_positions} positions > capacity {self.capacity}")
        size = min(self.capacity, -(-n_positions // GROWTH) * GROWTH)
        held = self.length
        for name in ("k", "v"):
            old = getattr(self, name)
            new = np.zeros((*old.shape[:2], size, old.shape[3]), np.float32)
            new[:, :, :held] = old[:, :, :held]
            setattr(self, name, new)

    @property
    def length(self) -> int:
        """Committed positions (real tokens whose K/V every layer holds)."""
        return len(self.token_ids)

    @property
    def free(self) -> int:
        return self.capacity - self.length

    def write(self, layer: int, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Store `keys`/`values` [n, kv_heads, head_dim] of `layer` at positions `start .. start+n-1`."""
        n = keys.shape[0]
        if start != self.length:
            raise ValueError(f"write at position {start} but the cache holds {self.length} tokens")
        if start + n > self.capacity:
            raise ValueError(f"KV cache full: {start} + {n} tokens > capacity {self.capacity}")
        self.reserve(start + n)
        self.k[layer, :, start : start + n] = keys.transpose(1, 0, 2)
        self.v[layer, :, start : start + n] = values.transpose(1, 0, 2)

    def keys(self, layer: int, end: int) -> np.ndarray:
        """Keys of positions `0 .. end-1` of `layer`: a view [kv_heads, end, head_dim]."""
        return self.k[layer, :, :end]

    def values(self, layer: int, end: int) -> np.ndarray:
        """Values of positions `0 .. end-1` of `layer`: a view [kv_heads, end, head_dim]."""
        return self.v[layer, :, :end]

    def advance(self, token_ids: list[int]) -> None:
        """Commit `token_ids`, whose K/V every layer has just written after the current length."""
        if self.length + len(token_ids) > self.capacity:
            raise ValueError("advance beyond the KV cache capacity")
        self.token_ids.extend(int(t) for t in token_ids)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (the stale K/V is overwritten later)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        del self.token_ids[length:]

    def reset(self) -> None:
        self.truncate(0)

    def common_prefix(self, token_ids: list[int]) -> int:
        """How many leading `token_ids` the cache already holds."""
        n = 0
        for held, new in zip(self.token_ids, token_ids):
            if held != new:
                break
            n += 1
        return n
