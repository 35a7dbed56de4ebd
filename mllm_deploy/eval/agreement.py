"""How close one computation is to its float32 reference: cosines, max-abs, top-1, kept per key.

    tally = Agreement()
    tally.add(("layer", 3), out, ref)       # out, ref [rows, width]: cosine of each row, max |out - ref|
    tally.summary()[("layer", 3)]           # {"cosine_min", "cosine_mean", "max_abs"}

Pure numpy; `verify` feeds it graphs, hidden states and logits.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair of a, b [rows, width] -> float64 [rows] (1.0 where both rows are 0)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    dots = (a64 * b64).sum(axis=1)
    out: np.ndarray = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
    return out


class Agreement:
    """Row cosines and max-abs differences of outputs against references, accumulated per key."""

    def __init__(self) -> None:
        self._cos: dict[Hashable, list[np.ndarray]] = {}
        self._max_abs: dict[Hashable, float] = {}

    def add(self, key: Hashable, out: np.ndarray, ref: np.ndarray) -> None:
        """out, ref [rows, width] (several outputs of one graph: concatenate them along width)."""
        self._cos.setdefault(key, []).append(row_cosine(out, ref))
        diff = float(np.abs(out.astype(np.float64) - ref).max()) if out.size else 0.0
        self._max_abs[key] = max(self._max_abs.get(key, 0.0), diff)

    def keys(self) -> list[Hashable]:
        return list(self._cos)

    def summary(self) -> dict[Hashable, dict[str, float]]:
        """key -> {cosine_min, cosine_mean, max_abs} over every row added under it."""
        out = {}
        for key, parts in self._cos.items():
            cos = np.concatenate(parts)
            out[key] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                        "max_abs": self._max_abs[key]}  # fmt: skip
        return out


def top1_agreement(logits: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per row: the same arg-max token as the reference (bool [rows])."""
    agree: np.ndarray = logits.argmax(axis=1) == ref.argmax(axis=1)
    return agree
