"""Perplexity of an engine (float or NPU prefill) on a token sequence, by chunked prefill with
logits at every position.

    nll = token_nll(engine, token_ids, chunk_size)     # [n - 1] float64, -log p(token[t+1] | ..t)
    ppl = float(np.exp(nll.mean()))

Each chunk's logits [chunk, vocab] are turned into log-probabilities and dropped, so memory
stays at one chunk's logits however long the text is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def token_nll(
    engine, token_ids: Sequence[int], chunk_size: int, on_chunk: Callable[[int, int], None] | None = None, cache=None
) -> np.ndarray:
    """Negative log-likelihood of every token after the first, float64 [n - 1]. `cache`: an
    empty KV cache of the engine's to fill (its counters can be read afterwards), else a new one."""
    ids = np.asarray(token_ids, np.int64)
    if ids.size < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    cache = engine.new_cache(ids.size) if cache is None else cache
    nll = np.empty(ids.size - 1, np.float64)
    pos = 0
    for event, logits in engine.prefill_chunks(cache, list(ids), chunk_size=chunk_size, logit_rows="all"):
        n = logits.shape[0]  # [n, vocab]: the chunk's real rows
        targets = ids[pos + 1 : pos + n + 1]  # the next token of each row (none after the last)
        nll[pos : pos + targets.size] = rows_nll(logits, targets)
        pos += n
        if on_chunk is not None:
            on_chunk(event.index + 1, event.n_chunks)
    return nll


def rows_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for the first `targets.size` rows, float64 [targets.size]
    (logits [n, vocab], n >= targets.size)."""
    z = logits[: targets.size].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))  # [n]
    nll: np.ndarray = log_norm - z[np.arange(targets.size), targets]
    return nll


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll)))
