"""Runtime: executes a model over a KV cache and streams plain events.

Float path (``device.npu_backend = "none"``):

    load_model(loaded_profile) -> LoadedModel                      session.py
    ChatSession(model, loaded_profile)                             session.py
        .send(text) / .reply_to(messages, system=) / .complete(raw_text)  -> Iterator[Event]
        .reset()
    FloatEngine(weights)                                           float_engine.py
        .new_cache(capacity) -> KVCache
        .prefill(cache, ids, chunk_size=, pad_last_chunk=, logit_rows=, cancel=) -> PrefillResult
        .prefill_chunks(...) -> Iterator[(ChunkDone, logits | None)]
        .decode_step(cache, token_id) -> logits [vocab]
        .qkv_step / .attention_step / .out_mlp_step   (one block in three steps)
    generate(engine, cache, prompt_ids, GenerationRequest, detokenizer, cancel) -> Iterator[Event]
    Sampler(SamplingSettings).choose(logits, seen_ids) -> token id     sampling.py
    require_runnable_backend(loaded_profile) -> backend name (else exit 3)   availability.py

Events (events.py): ChunkDone, PrefillDone, TokenEmitted, GenerationDone (always last).
Nothing here imports a front end.
"""
