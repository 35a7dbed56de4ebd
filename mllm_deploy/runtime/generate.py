"""One turn of generation as a stream of events: prefill what the cache lacks, then decode.

    for event in generate(engine, cache, prompt_ids, request, detokenizer, cancel):
        ...  # ChunkDone*, PrefillDone, TokenEmitted*, GenerationDone (always last)

The cache keeps whatever prefix of `prompt_ids` it already holds (multi-turn reuse); the
rest is prefilled in `chunk_size` chunks. `cancel` is checked between prefill chunks and
between tokens; a cancelled turn still ends with GenerationDone(finish_reason="cancelled").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mllm_deploy.events import (
    Event,
    FinishReason,
    GenerationDone,
    GenerationMetrics,
    PrefillDone,
    TokenEmitted,
)
from mllm_deploy.forward.kv_cache import KVCache
from mllm_deploy.runtime.engine import Engine
from mllm_deploy.runtime.sampling import Sampler, SamplingSettings
from mllm_deploy.runtime.stop_strings import StopStringFilter


class Detokenizer(Protocol):
    """Streaming detokenizer: text added by each token, never half a UTF-8 character."""

    def push(self, token_id: int) -> str: ...

    def finish(self) -> str: ...


@dataclass(frozen=True)
class GenerationRequest:
    max_new_tokens: int
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    eos_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    chunk_size: int = 256
    pad_last_chunk: bool = False
    truncated_tokens: int = 0  # reported only: tokens the caller dropped to fit the context


def generate(
    engine: Engine,
    cache: KVCache,
    prompt_ids: Sequence[int],
    request: GenerationRequest,
    detokenizer: Detokenizer,
    cancel: threading.Event | None = None,
) -> Iterator[Event]:
    """Stream one turn; see the module docstring."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) > cache.capacity:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds the KV cache ({cache.capacity})")
    cancelled = lambda: cancel is not None and cancel.is_set()
    started = time.perf_counter()
    # room for the whole turn up front: growing the cache mid-decode would hold two copies at once
    cache.reserve(min(cache.capacity, len(prompt_ids) + request.max_new_tokens))

    # Reuse the cached prefix; at least the last prompt token must run to give logits.
    reused = min(cache.common_prefix(prompt_ids), len(prompt_ids) - 1)
    cache.truncate(reused)
    new_ids = list(prompt_ids[reused:])
    logits = None
    prefilled = 0
    for chunk_event, chunk_logits in engine.prefill_chunks(
        cache, new_ids, chunk_size=request.chunk_size, pad_last_chunk=request.pad_last_chunk
    ):
        prefilled += chunk_event.tokens
        logits = chunk_logits
        yield chunk_event
        if prefilled < len(new_ids) and cancelled():
            break
    prefill_seconds = time.perf_counter() - started
    prefill_cancelled = prefilled < len(new_ids)
    yield PrefillDone(len(prompt_ids), reused, prefilled, request.truncated_tokens, prefill_seconds, prefill_cancelled)

    sampler = Sampler(request.sampling)
    stop_filter = StopStringFilter(request.stop)
    context_ids = list(prompt_ids)  # what the repetition penalty looks at
    generated: list[int] = []
    pieces: list[str] = []
    token_times: list[float] = []
    finish: FinishReason | None = "cancelled" if prefill_cancelled or cancelled() else None
    while finish is None:
        assert logits is not None  # a prefill that ran to its end returned the last token's logits
        token = sampler.choose(logits[-1], context_ids)
        generated.append(token)
        context_ids.append(token)
        is_eos = token in request.eos_ids
        text = stop_filter.feed("" if is_eos else detokenizer.push(token))
        if stop_filter.stopped:
            finish = "stop"
        elif is_eos:
            finish = "eos"
        elif len(generated) >= request.max_new_tokens:
            finish = "length"
        elif cache.free == 0:
            finish = "context"  # no room to feed this token back
        if finish in ("eos", "length", "context"):
            text += stop_filter.feed(detokenizer.finish())
            text += stop_filter.flush()
            if stop_filter.stopped:
                finish = "stop"
        token_times.append(time.perf_counter())
        pieces.append(text)
        yield TokenEmitted(len(generated) - 1, token, text, token_times[-1] - started)
        if finish is None and cancelled():
            finish = "cancelled"
        if finish is None:
            logits = engine.decode_step(cache, token)[None, :]

    decode_seconds = token_times[-1] - token_times[0] if token_times else 0.0
    metrics = GenerationMetrics(
        ttft_ms=(token_times[0] - started) * 1000.0 if token_times else None,
        prefill_seconds=prefill_seconds,
        prefill_tokens_per_s=prefilled / prefill_seconds if prefilled and prefill_seconds > 0 else None,
        decode_seconds=decode_seconds,
        decode_tokens_per_s=(len(generated) - 1) / decode_seconds
        if len(generated) > 1 and decode_seconds > 0
        else None,
    )
    yield GenerationDone(
        text="".join(pieces),
        finish_reason=finish,
        prompt_tokens=len(prompt_ids),
        reused_tokens=reused,
        prefilled_tokens=prefilled,
        truncated_tokens=request.truncated_tokens,
        generated_tokens=len(generated),
        token_ids=generated,
        metrics=metrics,
    )
