"""Greedy agreement of the INT8 CPU decode (runtime/decode_fast.py, decode_graphs.py) with the float32 decode.

For each prompt (chat-templated), prefill in float32 once, then decode greedily N tokens with
both decoders from copies of the same KV cache, and report how many leading tokens agree, the
first divergence, and the decode speed of each.

    .venv/bin/python scripts/decode_agreement.py [--tokens 32] [--threads 2] [--block 64]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
from threadpoolctl import threadpool_limits

from mllm_deploy.compile.decode_cache import cached_decode_graphs
from mllm_deploy.compile.decode_graphs import BLOCK
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.interface.session import LoadedModel
from mllm_deploy.model import load_tokenizer, load_weights, read_spec
from mllm_deploy.model.chat_template import choose_template_with_origin
from mllm_deploy.profile import load_profile
from mllm_deploy.runtime.decode_fast import Int8Decoder

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural processing unit is in two sentences.",
    "List three fruits and their colours.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet.",
    "Give me a recipe for pancakes.",
]


def greedy(step, cache, first: int, n: int) -> tuple[list[int], float]:
    tokens, token = [], first
    started = time.perf_counter()
    for _ in range(n):
        tokens.append(token)
        token = int(np.argmax(step(cache, token)))
    return tokens, (n - 1) / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=BLOCK, choices=(32, 64, 128), help="8-bit block of the decode weights")
    args = ap.parse_args()
    loaded = load_profile(None, [])
    spec = read_spec(loaded.profile.model.source)
    weights = load_weights(spec)
    tokenizer = load_tokenizer(spec)
    template, origin = choose_template_with_origin(spec, "auto")
    model = LoadedModel(spec, tokenizer, None, template, origin, 0.0)
    engine = FloatEngine(weights)
    decoder = Int8Decoder(
        spec, weights.tok_embd, engine.rope, cached_decode_graphs(spec, lambda: weights, args.block), args.threads
    )
    agree_total = 0
    with threadpool_limits(args.threads, user_api="blas"):
        for prompt in PROMPTS:
            ids = tokenizer.encode(model.render([{"role": "user", "content": prompt}]), allow_special=True)
            cache = engine.new_cache(len(ids) + args.tokens + 1)
            first = int(np.argmax(engine.prefill(cache, ids, chunk_size=256).logits[-1]))
            f_tokens, f_speed = greedy(engine.decode_step, copy.deepcopy(cache), first, args.tokens)
            q_tokens, q_speed = greedy(decoder.decode_step, copy.deepcopy(cache), first, args.tokens)
            same = next((i for i, (a, b) in enumerate(zip(f_tokens, q_tokens, strict=False)) if a != b), args.tokens)
            agree_total += same
            print(
                f"{same:3d}/{args.tokens} agree | float {f_speed:5.1f} tok/s | int8 {q_speed:5.1f} tok/s | {prompt!r}"
            )
            if same < args.tokens:
                print(f"      float: {tokenizer.decode(f_tokens)!r}\n      int8 : {tokenizer.decode(q_tokens)!r}")
    print(f"mean agreeing prefix: {agree_total / len(PROMPTS):.1f} of {args.tokens} tokens")


if __name__ == "__main__":
    main()
