"""One generation turn on a tiny random model with its real tokenizer: finish reasons, stop
strings across token boundaries, cancel, context limit, seeds, prefix reuse."""

from __future__ import annotations

import threading

import pytest

from mllm_deploy.events import ChunkDone, GenerationDone, PrefillDone, TokenEmitted
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.model import load_tokenizer, load_weights, read_spec
from mllm_deploy.runtime.generate import GenerationRequest, generate
from mllm_deploy.runtime.sampling import SamplingSettings


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    spec = read_spec(str(tiny_gguf))
    return FloatEngine(load_weights(spec, use_cache=False)), load_tokenizer(spec)


PROMPT = "What is the capital of France? It is"


def run(tiny, prompt_ids=None, *, cache=None, capacity=128, cancel=None, cancel_after_tokens=None, **request):
    engine, tokenizer = tiny
    ids = prompt_ids if prompt_ids is not None else tokenizer.encode(PROMPT)
    cache = cache if cache is not None else engine.new_cache(capacity)
    request.setdefault("max_new_tokens", 12)
    events = []
    for event in generate(engine, cache, ids, GenerationRequest(**request), tokenizer.stream(), cancel):
        events.append(event)
        if (
            cancel_after_tokens is not None
            and isinstance(event, TokenEmitted)
            and event.index + 1 == cancel_after_tokens
        ):
            cancel.set()
    done = events[-1]
    assert isinstance(done, GenerationDone)
    return done, events, cache


def test_length_finish_and_event_order(tiny):
    done, events, cache = run(tiny, max_new_tokens=6, chunk_size=4)
    kinds = [type(e).__name__ for e in events]
    n_prompt = done.prompt_tokens
    n_chunks = -(-n_prompt // 4)
    assert kinds == ["ChunkDone"] * n_chunks + ["PrefillDone"] + ["TokenEmitted"] * 6 + ["GenerationDone"]
    assert done.finish_reason == "length" and done.generated_tokens == 6 == len(done.token_ids)
    assert done.text == "".join(e.text for e in events if isinstance(e, TokenEmitted))
    assert done.text == tiny[1].decode(done.token_ids)
    assert cache.length == n_prompt + 5  # the last token is sampled, not fed back
    assert done.metrics.ttft_ms > 0 and done.metrics.prefill_tokens_per_s > 0


def test_eos_finish_hides_the_eos_token(tiny):
    first = run(tiny, max_new_tokens=20)[0].token_ids
    at = next(i for i in range(2, 20) if first[i] not in first[:i])
    done, _, _ = run(tiny, eos_ids=(first[at],), max_new_tokens=30)
    assert done.finish_reason == "eos"
    assert done.token_ids == first[: at + 1] and done.generated_tokens == at + 1
    assert done.text == tiny[1].decode(first[:at])


def test_stop_string_across_token_boundary_is_not_emitted(tiny):
    free, events, _ = run(tiny, max_new_tokens=20)
    pieces = [e.text for e in events if isinstance(e, TokenEmitted)]
    # a stop string made of the end of one token's text and the start of the next one's
    boundary = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[boundary][-2:] + pieces[boundary + 1][:2]
    expected = free.text[: free.text.index(stop)]
    done, events, _ = run(tiny, max_new_tokens=20, stop=(stop,))
    assert done.finish_reason == "stop"
    assert done.text == expected
    assert stop not in "".join(e.text for e in events if isinstance(e, TokenEmitted))


def test_context_finish_when_cache_is_full(tiny):
    ids = tiny[1].encode(PROMPT)
    done, _, cache = run(tiny, capacity=len(ids) + 3, max_new_tokens=50)
    assert done.finish_reason == "context"
    assert done.generated_tokens == 4 and cache.length == cache.capacity


def test_cancel_between_tokens_keeps_partial_result(tiny):
    cancel = threading.Event()
    done, _, cache = run(tiny, cancel=cancel, cancel_after_tokens=3, max_new_tokens=50)
    assert done.finish_reason == "cancelled" and done.generated_tokens == 3
    assert cache.length == done.prompt_tokens + 2


def test_cancel_during_prefill_stops_at_a_chunk_boundary(tiny):
    engine, tokenizer = tiny
    ids = tokenizer.encode(PROMPT * 6)
    cancel = threading.Event()
    cache = engine.new_cache(256)
    events = []
    for event in generate(
        engine, cache, ids, GenerationRequest(max_new_tokens=5, chunk_size=8), tokenizer.stream(), cancel
    ):
        events.append(event)
        if isinstance(event, ChunkDone) and event.index == 1:
            cancel.set()
    prefill = next(e for e in events if isinstance(e, PrefillDone))
    assert prefill.cancelled and prefill.prefilled_tokens == 16 == cache.length
    assert events[-1].finish_reason == "cancelled" and events[-1].generated_tokens == 0


def test_seed_reproducible_sampling(tiny):
    sampled = lambda seed: (
        run(tiny, max_new_tokens=15, sampling=SamplingSettings(temperature=1.0, seed=seed))[0].token_ids
    )
    assert sampled(5) == sampled(5)
    assert sampled(5) != sampled(6)


def test_second_prompt_reuses_the_cached_prefix(tiny):
    _, tokenizer = tiny
    first, _, cache = run(tiny, max_new_tokens=5)
    ids = tokenizer.encode(PROMPT) + first.token_ids + tokenizer.encode(" and Berlin")
    second, _, _ = run(tiny, ids, cache=cache, max_new_tokens=5)
    assert second.reused_tokens == first.prompt_tokens + 4
    assert second.prefilled_tokens == len(ids) - second.reused_tokens
    fresh, _, _ = run(tiny, ids, max_new_tokens=5)
    assert fresh.reused_tokens == 0 and fresh.token_ids == second.token_ids


def test_identical_prompt_reprefills_only_its_last_token(tiny):
    _, tokenizer = tiny
    ids = tokenizer.encode(PROMPT)
    first, _, cache = run(tiny, ids, max_new_tokens=3)
    again, _, _ = run(tiny, ids, cache=cache, max_new_tokens=3)
    assert again.reused_tokens == len(ids) - 1 and again.prefilled_tokens == 1
    assert again.token_ids == first.token_ids
