"""Where a decode token's time goes, against what this machine's memory could deliver.

Prefills a real prompt on the default profile's NPU path, then times `decode_step` (step graph
plus output head) and the head alone, token by token, at that context. It also measures the
read bandwidth of this process (one and two threads summing a 200 MB array) and the bytes one
token must read (the decode graphs' weights, and the KV cache positions held), so the gap
between the measured time and the bandwidth floor is visible. `--set decode.weight_bits=4`
(or `decode.weight_block=...`) measures another form of the decode graphs.

    .venv/bin/python scripts/decode_breakdown.py [--context 1024] [--tokens 96] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
from threadpoolctl import threadpool_limits

from mllm_deploy.bench.prompt_text import prompt_ids
from mllm_deploy.compile.decode_cache import cached_decode_graphs
from mllm_deploy.interface.engines import open_engine
from mllm_deploy.model import load_tokenizer, load_weights
from mllm_deploy.profile import load_profile
from mllm_deploy.resolve import resolve_profile


def read_bandwidth_gb_s(threads: int, megabytes: int = 200, repeat: int = 3) -> float:
    """Best of `repeat` sums over a float32 array split between `threads` Python threads
    (numpy releases the GIL while summing)."""
    array = np.ones(megabytes * 1024 * 1024 // 4, np.float32)
    parts = np.array_split(array, threads)
    best = float("inf")
    for _ in range(repeat):
        workers = [threading.Thread(target=part.sum) for part in parts]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - started)
    return array.nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens before decoding")
    parser.add_argument("--tokens", type=int, default=96, help="tokens decoded (the first 16 are not counted)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="profile override")
    args = parser.parse_args()

    resolved = resolve_profile(load_profile(None, args.set))
    weights = load_weights(resolved.spec)
    tokenizer = load_tokenizer(resolved.spec)
    with threadpool_limits(limits=resolved.cpu_threads, user_api="blas"):
        engine = open_engine(resolved, weights)
        cache = engine.new_cache(args.context + args.tokens + 1)
        logits = None
        for _, logits in engine.prefill_chunks(  # noqa: B007 - the last chunk's logits are read below
            cache,
            prompt_ids(tokenizer, args.context),
            chunk_size=resolved.profile.prefill.chunk_size,
            pad_last_chunk=True,
        ):
            pass
        cache.reserve(args.context + args.tokens)  # no growth inside the timed loop
        token = int(np.argmax(logits[-1]))
        totals, heads = [], []
        x_final = np.zeros((1, resolved.spec.hidden), np.float32)
        for _ in range(args.tokens):
            started = time.perf_counter()
            token = int(np.argmax(engine.decode_step(cache, token)))
            totals.append(time.perf_counter() - started)
            started = time.perf_counter()
            engine.decoder.lm_head(x_final)
            heads.append(time.perf_counter() - started)

    decode = resolved.profile.decode
    graphs = cached_decode_graphs(resolved.spec, lambda: weights, decode.weight_block, decode.weight_bits)
    step_graph = "step" if cache.scales is None else "step_kv8"
    weight_mb = sum((graphs / f"{name}.onnx").stat().st_size for name in (step_graph, "head")) / 1e6
    held = cache.length
    kv_mb = (cache.k[:, :, :held].nbytes + cache.v[:, :, :held].nbytes) / 1e6
    total_ms, head_ms = 1000 * float(np.median(totals[16:])), 1000 * float(np.median(heads[16:]))
    bandwidth = max(read_bandwidth_gb_s(1), read_bandwidth_gb_s(2))
    floor_ms = (weight_mb + kv_mb) / bandwidth
    print(
        f"context {args.context}..{held} tokens, decode graph {step_graph} ({engine.decoder.name}: "
        f"{decode.weight_bits}-bit blocks of {decode.weight_block}), {engine.decoder.threads} threads"
    )
    print(
        f"per token: {total_ms:.2f} ms = {1000 / total_ms:.1f} tok/s "
        f"(output head {head_ms:.2f} ms, step graph and Python {total_ms - head_ms:.2f} ms)"
    )
    print(f"bytes read per token: weights {weight_mb:.1f} MB + KV cache {kv_mb:.1f} MB")
    print(
        f"read bandwidth {bandwidth:.1f} GB/s -> floor {floor_ms:.2f} ms = {1000 / floor_ms:.0f} tok/s; "
        f"measured is {total_ms / floor_ms:.2f}x the floor"
    )


if __name__ == "__main__":
    main()
