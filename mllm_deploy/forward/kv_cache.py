"""Key/value cache of one conversation (float32, or int8 with calibrated per-channel steps), grown on demand.

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

Storage is float32, or int8 with fixed per-channel scales (`KVScales`, one step per layer, KV
head and head-dim channel, from calibration): value = q * scale, q in [-127, 127], values beyond
the calibrated range saturate. int8 is a quarter of the memory and of the bytes a decode step
reads; `keys`/`values` then return dequantized float32 copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GROWTH = 64
"""Buffers grow in multiples of this many positions (a turn reserves its prompt plus
`max_new_tokens` up front, so growth is rare and can be tight)."""


INT8_MAX = 127


@dataclass(frozen=True)
class KVScales:
    """Steps of an int8 KV cache, float32 `[layers, kv_heads, head_dim]` each: value = q * scale."""

    k: np.ndarray
    v: np.ndarray

    @classmethod
    def from_absmax(cls, k_absmax: np.ndarray, v_absmax: np.ndarray) -> KVScales:
        """Scales that put the largest magnitude seen (per channel) on the last int8 step."""

        def step(absmax):
            a = np.asarray(absmax, np.float32)
            return (np.maximum(a, np.float32(1e-6)) / np.float32(INT8_MAX)).astype(np.float32)

        return cls(step(k_absmax), step(v_absmax))


def quantize_kv(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x float [kv_heads, n, head_dim], scale [kv_heads, head_dim] -> int8, saturating."""
    q = np.rint(x / scale[:, None, :])
    return np.clip(q, -INT8_MAX, INT8_MAX, out=q).astype(np.int8)


class KVCache:
    """K and V of every layer, `[layers, kv_heads, capacity, head_dim]` (float32, or int8 with
    `scales`), plus the token ids held."""

    def __init__(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int, scales: KVScales | None = None):
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be >= 1, got {capacity}")
        if scales is not None and scales.k.shape != (n_layers, n_kv_heads, head_dim):
            raise ValueError(f"KV scales of shape {scales.k.shape} for a cache of {(n_layers, n_kv_heads, head_dim)}")
        self.n_layers = n_layers
        self.capacity = capacity
        self.scales = scales
        dtype = np.int8 if scales is not None else np.float32
        # np.zeros maps untouched pages lazily, so RSS grows with the tokens actually held.
        first = min(capacity, GROWTH)
        self.k = np.zeros((n_layers, n_kv_heads, first, head_dim), dtype)
        self.v = np.zeros((n_layers, n_kv_heads, first, head_dim), dtype)
        self.token_ids: list[int] = []  # the token at each committed position
        self.stored_values = 0  # K/V values quantized by `store` (int8 storage; decode's are not counted)
        self.saturated_values = 0  # of those, beyond the calibrated range (clipped to the last step)

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
            new = np.zeros((*old.shape[:2], size, old.shape[3]), old.dtype)
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
        self.store(layer, start, keys, values)

    def store(self, layer: int, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Put `keys`/`values` [n, kv_heads, head_dim] of `layer` at `start ..` without the
        length check of `write` (the DAG prefill stores chunks of different layers interleaved,
        and commits each chunk once every layer holds it). The buffers must cover them."""
        n = keys.shape[0]
        k, v = keys.transpose(1, 0, 2), values.transpose(1, 0, 2)
        if self.scales is not None:
            k, v = quantize_kv(k, self.scales.k[layer]), quantize_kv(v, self.scales.v[layer])
            self.stored_values += k.size + v.size
            self.saturated_values += int(
                np.count_nonzero(np.abs(k) == INT8_MAX) + np.count_nonzero(np.abs(v) == INT8_MAX)
            )
        self.k[layer, :, start : start + n] = k
        self.v[layer, :, start : start + n] = v

    def keys(self, layer: int, end: int) -> np.ndarray:
        """Keys of positions `0 .. end-1` of `layer`, float32 [kv_heads, end, head_dim]: a view,
        or a dequantized copy for int8 storage."""
        return self._read(self.k, None if self.scales is None else self.scales.k, layer, end)

    def values(self, layer: int, end: int) -> np.ndarray:
        """Values of positions `0 .. end-1` of `layer` (as `keys`)."""
        return self._read(self.v, None if self.scales is None else self.scales.v, layer, end)

    def attention_window(
        self, layer: int, start: int, keys: np.ndarray, values: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) [kv_heads, start + n, head_dim] float32 for a chunk that has just stored
        its n rows `keys`/`values` [n, kv_heads, head_dim] at `start`: the earlier positions as
        held, the chunk's own rows exactly as given (with int8 storage the prefill still attends
        its own chunk at full precision; decode reads everything back from int8)."""
        end = start + keys.shape[0]
        if self.scales is None:  # float32: the cache holds the chunk's rows exactly, a view will do
            return self.keys(layer, end), self.values(layer, end)
        return (self._window(self.k, self.scales.k, layer, start, keys),
                self._window(self.v, self.scales.v, layer, start, values))  # fmt: skip

    @staticmethod
    def _window(buffer: np.ndarray, scales: np.ndarray, layer: int, start: int, rows: np.ndarray) -> np.ndarray:
        """Positions 0 .. start-1 dequantized, then `rows` [n, kv_heads, head_dim] as given."""
        out = np.empty((buffer.shape[1], start + rows.shape[0], buffer.shape[3]), np.float32)
        np.multiply(buffer[layer, :, :start], scales[layer][:, None, :], out=out[:, :start])
        out[:, start:] = rows.transpose(1, 0, 2)
        return out

    @staticmethod
    def _read(buffer: np.ndarray, scales: np.ndarray | None, layer: int, end: int) -> np.ndarray:
        if scales is None:
            return buffer[layer, :, :end]
        return np.multiply(buffer[layer, :, :end], scales[layer][:, None, :], dtype=np.float32)

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

    def common_prefix(self, token_ids: Sequence[int]) -> int:
        """How many leading `token_ids` the cache already holds."""
        n = 0
        for held, new in zip(self.token_ids, token_ids, strict=False):
            if held != new:
                break
            n += 1
        return n
