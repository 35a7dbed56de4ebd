"""Next-token choice from logits: repetition penalty, temperature, top-k, top-p, seeded sampling.

Order (the one llama.cpp and transformers use): repetition penalty on the raw logits, then
greedy argmax if temperature is 0, else temperature, top-k, top-p, softmax and a draw.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int = 0

    @classmethod
    def from_decode_section(cls, decode) -> SamplingSettings:
        """From a profile's `[decode]` section."""
        return cls(decode.temperature, decode.top_k, decode.top_p, decode.repetition_penalty, decode.seed)


def apply_repetition_penalty(logits: np.ndarray, seen_ids: Iterable[int], penalty: float) -> np.ndarray:
    """Each distinct seen token: positive logit / penalty, negative logit * penalty. Returns a copy."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0:
        return out
    ids = np.fromiter(set(int(t) for t in seen_ids), dtype=np.int64)
    if ids.size:
        picked = out[ids]
        out[ids] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties at the boundary kept), the rest -inf. k <= 0: unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability sum reaches p, the rest -inf."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    before = np.cumsum(probs) - probs  # mass of the strictly more likely tokens
    keep_sorted = before < p  # always keeps the most likely token
    keep = np.zeros(logits.shape, bool)
    keep[order[keep_sorted]] = True
    return np.where(keep, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - np.max(logits))
    return shifted / shifted.sum()


class Sampler:
    """Chooses tokens with one seeded numpy Generator: the same seed gives the same tokens."""

    def __init__(self, settings: SamplingSettings):
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def probabilities(self, logits: np.ndarray, seen_ids: Iterable[int] = ()) -> np.ndarray:
        """The distribution a draw would use (float64, zeros outside top-k/top-p)."""
        s = self.settings
        scores = apply_repetition_penalty(logits, seen_ids, s.repetition_penalty)
        scores = scores / np.float32(max(s.temperature, 1e-6))
        scores = top_p_filter(top_k_filter(scores, s.top_k), s.top_p)
        return softmax(scores)

    def choose(self, logits: np.ndarray, seen_ids: Iterable[int] = ()) -> int:
        """Next token id from logits [vocab]; `seen_ids` feeds the repetition penalty."""
        s = self.settings
        if s.temperature == 0.0:
            return int(np.argmax(apply_repetition_penalty(logits, seen_ids, s.repetition_penalty)))
        probs = self.probabilities(logits, seen_ids)
        cumulative = np.cumsum(probs)
        draw = self.rng.random() * cumulative[-1]
        return int(min(np.searchsorted(cumulative, draw, side="right"), len(probs) - 1))
