"""Calibration: run the float model over the calibration set and record activation statistics.

    token_ids = calibration_tokens(profile, model, base_dir)      # self-generated or text files
    stats = collect_activation_stats(engine, token_ids, percentile)  # -> ActivationStats

Data (`calibration.source`):
- `self`: the model writes the text itself from CALIBRATION_PROMPTS (fixed, diverse), sampled
  with a fixed seed (temperature 0.8, top-k 40, end-of-turn tokens suppressed so every sample
  reaches `tokens_per_sample`). All samples are decoded together in one batch, so generating
  16 x 256 tokens costs about as much as one sequence of 256.
- otherwise a text file path or glob (relative to the profile file): the files are
  concatenated and cut into `samples` pieces of `tokens_per_sample` tokens.

Statistics, three passes of chunked prefill over the samples (float engine with recording
linears):
1. per linear input: the values above the running top-K threshold (K = the values that lie at
   or beyond the percentile) with their channels, and the max |x|: exact percentile clamps and
   per-channel outlier counts without storing every activation; and from each sample's KV
   cache, the per-channel range of keys (RoPE pair norms) and values;
2. per linear output: max |y| of the float product and of the product with the input clamped
   (y - outliers @ W.T, sparse), which sets the output grids;
3. per linear input, its grid damage: each layer is run once more per input with only that
   input on its max-abs uint8 grid (what a pruned input gets), and the relative change of the
   residual stream after the layer, |Δh|² / |h|² per token, is averaged. This is the pruning
   ranking: on SmolLM2 its order matches the end-to-end KL divergence of pruning each input
   alone (Spearman 0.99 over the 120 inputs) at about 4 extra layer evaluations per layer.
"""

from __future__ import annotations

import glob
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mllm_deploy.compile.calibration import ActivationStats, InputStats, KVAbsMax
from mllm_deploy.compile.quantize import activation_quant_symmetric
from mllm_deploy.errors import Location, user_error
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.forward.kv_cache import KVCache
from mllm_deploy.forward.layers import ChunkSpan, FloatBlockLinears, silu_mul_
from mllm_deploy.model.chat_template import render_chat
from mllm_deploy.model.linears import GRAPH_KINDS, GraphKind
from mllm_deploy.model.spec import LayerWeights, ModelSpec
from mllm_deploy.profile.models import Profile

if TYPE_CHECKING:  # at run time the tokenizer (and the tokenizers library) comes from the caller
    from mllm_deploy.model.tokenizer import ModelTokenizer

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Where = Callable[[str], Location]  # profile key -> its location (`LoadedProfile.where`)
Products = dict[str, tuple[np.ndarray, np.ndarray]]  # linear name -> (its float output y, its weight W)
Sink = Callable[[int, GraphKind, np.ndarray, Products], None]  # (layer, kind, linear input x, products)

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
MAX_KEPT_VALUES = 1 << 20  # beyond this K, percentiles come from a strided subsample


def calibration_tokens(
    profile: Profile,
    tokenizer: ModelTokenizer,
    engine: FloatEngine,
    base_dir: Path | None,
    where: Where | None = None,
    progress: Progress | None = None,
) -> list[list[int]]:
    """The calibration samples as token id lists (each `tokens_per_sample` long, except that a
    short text file gives fewer, shorter samples)."""
    cal = profile.calibration
    if cal.source == "self":
        return self_generated_tokens(engine, tokenizer, cal.samples, cal.tokens_per_sample, progress)
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
) -> list[list[int]]:
    """`samples` sequences of chat prompt + the model's own seeded continuation, decoded as one batch."""

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
    caches = [engine.new_cache(tokens_per_sample) for _ in seqs]
    logits = np.stack([_last_logits(engine, c, s) for c, s in zip(caches, seqs, strict=True)])  # [B, vocab]
    steps = tokens_per_sample - min(len(s) for s in seqs)
    for step in range(steps):
        if progress:
            progress("generating calibration text", step, steps)
        live = [b for b, s in enumerate(seqs) if len(s) < tokens_per_sample]
        tokens = [_sample(logits[b], banned, rng) for b in live]
        for b, t in zip(live, tokens, strict=True):
            seqs[b].append(t)
        live = [b for b in live if len(seqs[b]) < tokens_per_sample]  # the last token needs no forward
        if not live:
            break
        x = engine.weights.tok_embd[[seqs[b][-1] for b in live]]  # [B, hidden]
        for layer in range(engine.spec.n_layers):
            q, k, v = engine.qkv_step(layer, x)  # [B, q_dim], [B, kv_dim] x2
            attn = np.concatenate([
                engine.attention_step(layer, q[j : j + 1], k[j : j + 1], v[j : j + 1],
                                      ChunkSpan(caches[b].length, 1, 1), caches[b])
                for j, b in enumerate(live)
            ])  # fmt: skip
            x = engine.out_mlp_step(layer, x, attn)
        for b in live:
            caches[b].advance([seqs[b][-1]])
        logits[live] = engine.logits(x)
    if progress:
        progress("generating calibration text", steps, steps)
    return seqs


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


class _TopValues:
    """The K largest |x| of a stream of [T, width] arrays, with their channels, plus max and count."""

    def __init__(self, k: int, width: int, stride: int) -> None:
        self.k, self.width, self.stride = k, width, stride
        self.values = np.empty(0, np.float32)
        self.channels = np.empty(0, np.int32)
        self.floor = -1.0  # every value <= floor is known not to be in the top K
        self.max_abs = 0.0
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        a = np.abs(x).reshape(-1)  # [T * width]
        self.max_abs = max(self.max_abs, float(a.max()))
        idx = np.arange(0, a.size, self.stride) if self.stride > 1 else None
        if idx is not None:
            a_s = a[idx]
        else:
            a_s = a
        self.count += a_s.size
        pick = np.flatnonzero(a_s > self.floor)
        if pick.size > 4 * self.k:
            pick = pick[np.argpartition(a_s[pick], -self.k)[-self.k :]]
        channels = ((idx[pick] if idx is not None else pick) % self.width).astype(np.int32)
        values = np.concatenate([self.values, a_s[pick]])
        channels = np.concatenate([self.channels, channels])
        if values.size > self.k:
            keep = np.argpartition(values, -self.k)[-self.k :]
            values, channels = values[keep], channels[keep]
        self.values, self.channels = values, channels
        if values.size >= self.k:
            self.floor = float(values.min())

    def result(self, layer: int, kind: GraphKind, grid_damage: float = 0.0) -> InputStats:
        clamp = float(self.values.min()) if self.values.size else self.max_abs
        beyond = self.channels[self.values > clamp]
        counts = np.bincount(beyond, minlength=self.width) * self.stride
        return InputStats(
            layer=layer, kind=kind, width=self.width, values=self.count * self.stride,
            percentile_clamp=max(clamp, 1e-8), max_abs=max(self.max_abs, 1e-8),
            channel_outliers={int(c): int(n) for c, n in enumerate(counts) if n},
            estimated=self.stride > 1, grid_damage=grid_damage,
        )  # fmt: skip


class _Recorder:
    """BlockLinears of one layer in float that hand every linear input to the statistics."""

    def __init__(self, engine: FloatEngine, layer: int, sink: Sink) -> None:
        self.w, self.layer, self.sink = engine.weights.layers[layer], layer, sink

    def qkv(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = self.w
        q, k, v = x @ w.wq.T, x @ w.wk.T, x @ w.wv.T  # [T, q_dim], [T, kv_dim] x2
        for y, b in ((q, w.bq), (k, w.bk), (v, w.bv)):
            if b is not None:
                y += b
        self.sink(self.layer, "qkv", x, {"attn_q": (q, w.wq), "attn_k": (k, w.wk), "attn_v": (v, w.wv)})
        return q, k, v

    def attn_output(self, attn: np.ndarray) -> np.ndarray:
        y: np.ndarray = attn @ self.w.wo.T  # [T, hidden]
        self.sink(self.layer, "o_proj", attn, {"attn_output": (y, self.w.wo)})
        return y

    def mlp(self, x: np.ndarray) -> np.ndarray:
        w = self.w
        gate, up = x @ w.w_gate.T, x @ w.w_up.T  # [T, ffn]
        self.sink(self.layer, "gate_up", x, {"ffn_gate": (gate, w.w_gate), "ffn_up": (up, w.w_up)})
        h = silu_mul_(gate, up)
        y: np.ndarray = h @ w.w_down.T  # [T, hidden]
        self.sink(self.layer, "down", h, {"ffn_down": (y, w.w_down)})
        return y


def _widths(engine: FloatEngine) -> dict[GraphKind, int]:
    s = engine.spec
    return {"qkv": s.hidden, "o_proj": s.q_dim, "gate_up": s.hidden, "down": s.ffn}


def collect_activation_stats(
    engine: FloatEngine,
    samples: Sequence[Sequence[int]],
    percentile: float,
    *,
    source: str,
    chunk_size: int = 256,
    progress: Progress | None = None,
    started: float | None = None,
) -> ActivationStats:
    """Two statistics passes over `samples` (see the module docstring)."""
    started = time.perf_counter() if started is None else started
    total_tokens = sum(len(s) for s in samples)
    n_layers = engine.spec.n_layers
    tops: dict[tuple[int, GraphKind], _TopValues] = {}
    for layer in range(n_layers):
        for kind, width in _widths(engine).items():
            n = total_tokens * width
            k = n - math.ceil(percentile / 100.0 * n) + 1
            stride = max(1, math.ceil(k / MAX_KEPT_VALUES))
            tops[(layer, kind)] = _TopValues(max(1, math.ceil(k / stride)), width, stride)

    def record(layer: int, kind: GraphKind, x: np.ndarray, _outputs: Products) -> None:
        tops[(layer, kind)].add(x)

    kv = _KVRange(engine.spec)
    _run_pass(engine, samples, record, chunk_size, progress, "calibration pass 1/3 (inputs)", on_cache=kv.add)
    clamps = {key: top.result(*key).percentile_clamp for key, top in tops.items()}
    out_max: dict[str, float] = {}
    out_clamped: dict[str, float] = {}

    def outputs(layer: int, kind: GraphKind, x: np.ndarray, products: Products) -> None:
        c = clamps[(layer, kind)]
        rows, cols = np.nonzero(np.abs(x) > c)
        for name, (y, w) in products.items():
            key = f"{layer}/{name}"
            out_max[key] = max(out_max.get(key, 0.0), float(np.abs(y).max()))
            if rows.size:
                channels = np.unique(cols)
                r = x[:, channels] - np.clip(x[:, channels], -c, c)  # [T, n_outlier_channels]
                y = y - r @ w[:, channels].T  # [T, out]
            out_clamped[key] = max(out_clamped.get(key, 0.0), float(np.abs(y).max()))

    _run_pass(engine, samples, outputs, chunk_size, progress, "calibration pass 2/3 (outputs)")
    max_abs = {key: max(top.max_abs, 1e-8) for key, top in tops.items()}
    damage = _grid_damage(engine, samples, max_abs, chunk_size, progress, "calibration pass 3/3 (grid damage)")
    inputs = [
        tops[(layer, kind)].result(layer, kind, damage[(layer, kind)])
        for layer in range(n_layers)
        for kind in GRAPH_KINDS
    ]
    digest = hashlib.sha256(np.concatenate([np.asarray(s, np.int64) for s in samples]).tobytes()).hexdigest()
    return ActivationStats(
        source=source, text_sha256=digest, samples=len(samples), tokens=total_tokens,
        scale_percentile=percentile, inputs=inputs, output_max=out_max, output_max_clamped=out_clamped,
        kv_absmax=kv.result(), seconds=time.perf_counter() - started,
    )  # fmt: skip


class _KVRange:
    """Running per-channel maxima of the KV cache: |v|, and for keys the norm of each channel's
    RoPE pair (see `KVAbsMax.keys`)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.rope_style = spec.rope_style
        self.keys = np.zeros((spec.n_layers, spec.n_kv_heads, spec.head_dim), np.float32)
        self.values = np.zeros_like(self.keys)

    def add(self, cache: KVCache) -> None:
        n = cache.length
        k, v = cache.k[:, :, :n], cache.v[:, :, :n]  # [layers, kv_heads, n, head_dim], float32
        half = k.shape[-1] // 2
        if self.rope_style == "adjacent":  # pairs (2i, 2i+1)
            norms = np.sqrt(k[..., 0::2] ** 2 + k[..., 1::2] ** 2).max(axis=2)
            pair_max = np.repeat(norms, 2, axis=-1)
        else:  # "half": pairs (i, i + head_dim/2)
            norms = np.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2).max(axis=2)
            pair_max = np.concatenate([norms, norms], axis=-1)
        np.maximum(self.keys, pair_max, out=self.keys)
        np.maximum(self.values, np.abs(v).max(axis=2), out=self.values)

    def result(self) -> KVAbsMax:
        return KVAbsMax(keys=self.keys.tolist(), values=self.values.tolist())


def _run_pass(
    engine: FloatEngine,
    samples: Sequence[Sequence[int]],
    sink: Sink,
    chunk_size: int,
    progress: Progress | None,
    stage: str,
    on_cache: Callable[[KVCache], None] | None = None,
) -> None:
    recording = engine.with_linears([_Recorder(engine, layer, sink) for layer in range(engine.spec.n_layers)])
    for i, ids in enumerate(samples):
        if progress:
            progress(stage, i, len(samples))
        cache = recording.new_cache(len(ids))
        recording.prefill(cache, list(ids), chunk_size=chunk_size, logit_rows="none")
        if on_cache is not None:
            on_cache(cache)
    if progress:
        progress(stage, len(samples), len(samples))


class _MaxAbsGrid(FloatBlockLinears):
    """Float linears of one layer, except that one input is on its max-abs uint8 grid."""

    def __init__(self, layer_weights: LayerWeights, kind: GraphKind, max_abs: float) -> None:
        super().__init__(layer_weights)
        self.kind, self.grid = kind, activation_quant_symmetric(max_abs, "uint8")

    def _in(self, kind: str, x: np.ndarray) -> np.ndarray:
        return self.grid.fake_quantize(x) if kind == self.kind else x

    def qkv(self, x_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q, k, v = super().qkv(self._in("qkv", x_norm))
        return q, k, v

    def attn_output(self, attn: np.ndarray) -> np.ndarray:
        y: np.ndarray = super().attn_output(self._in("o_proj", attn))
        return y

    def mlp(self, x_norm: np.ndarray) -> np.ndarray:
        x = self._in("gate_up", x_norm)
        h = silu_mul_(x @ self.w.w_gate.T, x @ self.w.w_up.T)  # [T, ffn]
        y: np.ndarray = self._in("down", h) @ self.w.w_down.T  # [T, hidden]
        return y


def _grid_damage(
    engine: FloatEngine,
    samples: Sequence[Sequence[int]],
    max_abs: dict[tuple[int, GraphKind], float],
    chunk_size: int,
    progress: Progress | None,
    stage: str,
) -> dict[tuple[int, GraphKind], float]:
    """(layer, kind) -> mean over tokens of |h' - h|² / |h|², h the residual stream after the layer
    in float and h' the same with only that input on its max-abs grid (pass 3, module docstring)."""
    n_layers = engine.spec.n_layers
    total = {key: 0.0 for key in max_abs}
    tokens = 0
    probe = engine.with_linears(engine.block_linears)  # one layer's linears are swapped below
    for i, ids in enumerate(samples):
        if progress:
            progress(stage, i, len(samples))
        cache = engine.new_cache(len(ids))
        for start in range(0, len(ids), chunk_size):
            part = list(ids[start : start + chunk_size])
            span = ChunkSpan(start=cache.length, n_real=len(part), n_rows=len(part))
            engine.rope.ensure(span.end)
            x = engine.weights.tok_embd[np.asarray(part)]  # [T, hidden]
            for layer in range(n_layers):
                probed: dict[GraphKind, np.ndarray] = {}
                for kind in GRAPH_KINDS:  # before the float block: it rewrites this chunk's K/V last
                    probe.block_linears[layer] = _MaxAbsGrid(engine.weights.layers[layer], kind, max_abs[(layer, kind)])
                    probed[kind] = probe.block(layer, x, span, cache)
                probe.block_linears[layer] = engine.block_linears[layer]
                x = engine.block(layer, x, span, cache)  # [T, hidden]
                norm = np.einsum("td,td->t", x, x, dtype=np.float64) + 1e-30  # [T]
                for kind, h in probed.items():
                    d = h - x
                    total[(layer, kind)] += float((np.einsum("td,td->t", d, d, dtype=np.float64) / norm).sum())
            cache.advance(part)
            tokens += len(part)
    if progress:
        progress(stage, len(samples), len(samples))
    return {key: value / max(1, tokens) for key, value in total.items()}
