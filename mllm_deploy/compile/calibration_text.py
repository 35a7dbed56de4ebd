"""The calibration text: token ids that calibration runs the float model over.

    token_ids = calibration_tokens(profile, tokenizer, engine, base_dir)

Data (`calibration.source`):
- `self`: the model writes the text itself from CALIBRATION_PROMPTS (fixed, diverse), sampled
  with a fixed seed (temperature 0.8, top-k 40, end-of-turn tokens suppressed so every sample
  reaches `tokens_per_sample`). All samples are decoded together in one batch over their KV
  caches, so generating 16 x 256 tokens costs about as much as one sequence of 256; each step's
  large products are split by output columns, and its attention by sample, over the machine's
  cores (`compile.parallel`: the same values on any number of cores).
- otherwise a text file path or glob (relative to the profile file): the files are
  concatenated and cut into `samples` pieces of `tokens_per_sample` tokens.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mllm_deploy.compile.calibrate_layer import check_plain_blocks
from mllm_deploy.compile.parallel import BuildPool, products_t
from mllm_deploy.errors import Location, user_error
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.forward.kv_cache import KVCache
from mllm_deploy.forward.layers import ChunkSpan, rms_norm, silu_mul_
from mllm_deploy.model.chat_template import render_chat
from mllm_deploy.model.spec import LayerWeights
from mllm_deploy.profile.models import Profile

if TYPE_CHECKING:  # at run time the tokenizer (and the tokenizers library) comes from the caller
    from mllm_deploy.model.tokenizer import ModelTokenizer

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Where = Callable[[str], Location]  # profile key -> its location (`LoadedProfile.where`)

CALIBRATION_PROMPTS = (
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What were the main causes of the First World War?",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Give me a recipe for a simple vegetable soup.",
    "Summarize the plot of a detective novel set in Victorian London.",
    "How does compound interest work? Give a numeric example.",
    "Describe the water cycle to a ten-year-old.",
    "Write a polite email asking a colleague to review a report by Friday.",
    "What are the pros and cons of electric cars?",
    "Translate into French and explain the grammar: 'I would have gone if it had not rained.'",
    "List five tips for learning to play the guitar.",
    "Write a poem about autumn in a big city.",
    "Explain the difference between a virus and a bacterium.",
    "How do I sort a list of dictionaries by a key in JavaScript?",
    "Describe a football match between two rival teams as a sports reporter.",
)
GEN_SEED, GEN_TEMPERATURE, GEN_TOP_K = 1234, 0.8, 40
GENERATION_VERSION = 2
"""Part of the identity of `calibration.source = "self"` (so of the cached samples, statistics and
artifacts): bump it whenever a change would make `self_generated_tokens` write different text.
Without it, samples cached by earlier code were reused under the same package version, which is
why two caches measured different max-abs scales (policy = none: 60.45 vs 58.94 perplexity);
fresh generations agree byte for byte across runs and thread counts."""


def calibration_tokens(
    profile: Profile,
    tokenizer: ModelTokenizer,
    engine: FloatEngine,
    base_dir: Path | None,
    where: Where | None = None,
    progress: Progress | None = None,
    pool: BuildPool | None = None,
) -> list[list[int]]:
    """The calibration samples as token id lists (each `tokens_per_sample` long, except that a
    short text file gives fewer, shorter samples)."""
    cal = profile.calibration
    if cal.source == "self":
        return self_generated_tokens(engine, tokenizer, cal.samples, cal.tokens_per_sample, progress, pool)
    return text_file_tokens(cal.source, tokenizer, cal.samples, cal.tokens_per_sample, base_dir, where)


def text_file_tokens(
    source: str,
    tokenizer: ModelTokenizer,
    samples: int,
    tokens_per_sample: int,
    base_dir: Path | None,
    where: Where | None = None,
) -> list[list[int]]:
    pattern = Path(source).expanduser()
    if not pattern.is_absolute() and base_dir is not None:
        pattern = Path(base_dir) / pattern
    files = (
        sorted(glob.glob(str(pattern)))
        if glob.has_magic(str(pattern))
        else ([str(pattern)] if pattern.exists() else [])
    )
    loc = (where or _key_only)("calibration.source")
    if not files:
        raise user_error("calibration text not found", value=source, allowed="`self`, a text file or a glob", **loc)
    text: list[str] = []
    for name in files:
        try:
            text.append(Path(name).read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            raise user_error(f"cannot read calibration text {name}: {exc.strerror or exc}", **loc) from None
    ids = tokenizer.encode("\n\n".join(text), allow_special=False)
    if len(ids) < 8:
        raise user_error(
            f"calibration text has only {len(ids)} tokens", value=source, allowed="at least 8 tokens", **loc
        )
    n = min(samples, math.ceil(len(ids) / tokens_per_sample))
    return [ids[i * tokens_per_sample : (i + 1) * tokens_per_sample] for i in range(n)]


def _key_only(key: str) -> Location:
    """The location of a profile key when no profile file is known: the key alone."""
    return {"file": None, "line": None, "col": None, "key": key}


def self_generated_tokens(
    engine: FloatEngine,
    tokenizer: ModelTokenizer,
    samples: int,
    tokens_per_sample: int,
    progress: Progress | None = None,
    pool: BuildPool | None = None,
) -> list[list[int]]:
    """`samples` sequences of chat prompt + the model's own seeded continuation, decoded as one batch."""
    if pool is None:
        with BuildPool() as own:
            return self_generated_tokens(engine, tokenizer, samples, tokens_per_sample, progress, own)

    check_plain_blocks(engine)  # _BatchStep runs a plain block's pieces
    rng = np.random.default_rng(GEN_SEED)
    banned = [t for t in {*tokenizer.eos_ids, tokenizer.bos_id} if t is not None]
    seqs: list[list[int]] = []
    for i in range(samples):
        prompt = CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)]
        text = render_chat(
            [{"role": "user", "content": prompt}],
            template=engine.spec.chat_template or _CHATML,
            add_generation_prompt=True,
            bos_token="",
            eos_token="",
            origin="calibration",
        )
        seqs.append(tokenizer.encode(text, allow_special=True)[:tokens_per_sample])
    caches = [engine.new_cache(tokens_per_sample) for _ in seqs]  # also sizes the RoPE tables for the threads
    steps = tokens_per_sample - min(len(s) for s in seqs)
    if progress:
        progress("generating calibration text", 0, steps)
    prompt_logits = pool.map(lambda b: _last_logits(engine, caches[b], seqs[b]), len(seqs))
    logits: np.ndarray = np.stack(prompt_logits)  # [B, vocab]
    step = _BatchStep(engine, pool)
    for done in range(steps):
        live = [b for b, s in enumerate(seqs) if len(s) < tokens_per_sample]
        tokens = [_sample(logits[b], banned, rng) for b in live]
        for b, t in zip(live, tokens, strict=True):
            seqs[b].append(t)
        live = [b for b in live if len(seqs[b]) < tokens_per_sample]  # the last token needs no forward
        if not live:
            break
        logits[live] = step([seqs[b][-1] for b in live], [caches[b] for b in live])
        if progress:
            progress("generating calibration text", done + 1, steps)
    if progress:
        progress("generating calibration text", steps, steps)
    return seqs


class _BatchStep:
    """One decode step of a batch of sequences, each over its own KV cache: the float engine's
    block, with the large products split by output columns and the attention by sequence over
    the pool's threads (the same values as `FloatEngine.block`, see `compile.parallel`)."""

    def __init__(self, engine: FloatEngine, pool: BuildPool) -> None:
        self.engine, self.pool = engine, pool

    def __call__(self, token_ids: list[int], caches: list[KVCache]) -> np.ndarray:
        """Feed one token to each cache; returns the next-token logits [B, vocab]."""
        engine, pool = self.engine, self.pool
        eps = engine.spec.rms_eps
        x = engine.weights.tok_embd[token_ids]  # [B, hidden]
        for layer, w in enumerate(engine.weights.layers):
            q, k, v = self._qkv(w, rms_norm(x, w.attn_norm, eps))  # [B, q_dim], [B, kv_dim] x2
            attn = np.empty_like(q)  # [B, q_dim]

            def attend(b: int, layer: int = layer, q: np.ndarray = q, k: np.ndarray = k, v: np.ndarray = v,
                       attn: np.ndarray = attn) -> None:  # fmt: skip
                span = ChunkSpan(caches[b].length, 1, 1)
                attn[b : b + 1] = engine.attention_step(
                    layer, q[b : b + 1], k[b : b + 1], v[b : b + 1], span, caches[b]
                )

            pool.map(attend, len(caches))
            (o,) = products_t(pool, attn, [w.wo])
            h = x + o
            gate, up = products_t(pool, rms_norm(h, w.ffn_norm, eps), [w.w_gate, w.w_up])  # [B, ffn]
            (down,) = products_t(pool, silu_mul_(gate, up), [w.w_down])
            x = h + down
        for cache, token in zip(caches, token_ids, strict=True):
            cache.advance([token])
        (logits,) = products_t(pool, rms_norm(x, engine.weights.output_norm, eps), [engine.weights.output])
        return logits

    def _qkv(self, w: LayerWeights, x_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, k, v = products_t(self.pool, x_norm, [w.wq, w.wk, w.wv])
        for y, bias in ((q, w.bq), (k, w.bk), (v, w.bv)):
            if bias is not None:
                y += bias
        return q, k, v


_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _last_logits(engine: FloatEngine, cache: KVCache, ids: list[int]) -> np.ndarray:
    """Prefill `ids` into `cache` and return the last token's logits [vocab]."""
    logits = engine.forward_chunk(cache, ids, logit_rows="last")
    if logits is None:  # logit_rows="last" always returns the last row
        raise RuntimeError("forward_chunk returned no logits for logit_rows='last'")
    row: np.ndarray = logits[0]
    return row


def _sample(logits: np.ndarray, banned: list[int], rng: np.random.Generator) -> int:
    z = logits.astype(np.float64) / GEN_TEMPERATURE
    z[banned] = -np.inf
    top = np.argpartition(z, -GEN_TOP_K)[-GEN_TOP_K:]
    p = np.exp(z[top] - z[top].max())
    return int(top[rng.choice(len(top), p=p / p.sum())])
