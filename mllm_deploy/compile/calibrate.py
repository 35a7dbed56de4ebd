"""Calibration statistics: run the float model over the calibration text and record what its
activations look like (the text itself comes from `compile.calibration_text`).

    stats = collect_activation_stats(engine, token_ids, percentile)  # -> ActivationStats

The samples are run layer by layer (each layer over every sample before the next layer), so the
three statistics that need the whole calibration set's clamps cost one float layer and the
probes instead of three passes of the model:
1. per linear input: the values above the running top-K threshold (K = the values that lie at
   or beyond the percentile) with their channels, and the max |x|: exact percentile clamps and
   per-channel outlier counts without storing every activation; and from each sample's K/V, the
   per-channel range of keys (RoPE pair norms) and values;
2. per linear output: max |y| of the float product and of the product with the input clamped
   (y - outliers @ W.T, sparse), which sets the output grids;
3. per linear input, its grid damage: the layer is run once more per input with only that
   input on its max-abs uint8 grid (what a pruned input gets), and the relative change of the
   residual stream after the layer, |Δh|² / |h|² per token, is averaged. This is the pruning
   ranking: on SmolLM2 its order matches the end-to-end KL divergence of pruning each input
   alone (Spearman 0.99 over the 120 inputs) at about 3 extra layer evaluations per layer.

Every value is what the chunked prefill of each sample (`chunk_size` tokens a chunk) computes;
the samples are cut into blocks of whole samples (BLOCK_TOKENS), which the machine's cores run
in parallel (`compile.parallel`), and whose results are merged in sample order, so the
statistics do not depend on the number of cores. The float layer's activations of every block
are kept between the two halves of a layer when they fit in KEEP_BYTES, else recomputed.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence

import numpy as np

from mllm_deploy.compile.calibrate_layer import Block, LayerActs, check_plain_blocks, float_layer, probe_layer
from mllm_deploy.compile.calibration import ActivationStats, InputStats, KVAbsMax
from mllm_deploy.compile.calibration_text import Progress
from mllm_deploy.compile.parallel import BuildPool
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.forward.kv_cache import KVCache
from mllm_deploy.model.linears import GRAPH_KINDS, GraphKind
from mllm_deploy.model.spec import ModelSpec

MAX_KEPT_VALUES = 1 << 20  # beyond this K, percentiles come from a strided subsample
BLOCK_TOKENS = 1024  # whole samples per block, up to this many tokens (one sample at least)
KEEP_BYTES = 384 << 20  # keep the float layer's activations of all blocks up to this size
STAGE = "calibration statistics"


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


def _widths(spec: ModelSpec) -> dict[GraphKind, int]:
    return {"qkv": spec.hidden, "o_proj": spec.q_dim, "gate_up": spec.hidden, "down": spec.ffn}


def blocks_of(samples: Sequence[Sequence[int]], chunk_size: int) -> list[Block]:
    """Consecutive whole samples, up to BLOCK_TOKENS tokens a block (a longer sample alone)."""
    blocks: list[Block] = []
    current: list[Sequence[int]] = []
    for ids in samples:
        if current and sum(len(s) for s in current) + len(ids) > BLOCK_TOKENS:
            blocks.append(Block(current, chunk_size))
            current = []
        current.append(ids)
    if current:
        blocks.append(Block(current, chunk_size))
    return blocks


def collect_activation_stats(
    engine: FloatEngine,
    samples: Sequence[Sequence[int]],
    percentile: float,
    *,
    source: str,
    chunk_size: int = 256,
    progress: Progress | None = None,
    started: float | None = None,
    pool: BuildPool | None = None,
) -> ActivationStats:
    """The statistics of the module docstring over `samples`, layer by layer."""
    if pool is None:
        with BuildPool() as own:
            return collect_activation_stats(engine, samples, percentile, source=source, chunk_size=chunk_size,
                                            progress=progress, started=started, pool=own)  # fmt: skip
    started = time.perf_counter() if started is None else started
    check_plain_blocks(engine)
    spec = engine.spec
    total_tokens = sum(len(s) for s in samples)
    blocks = blocks_of(samples, chunk_size)
    engine.rope.ensure(max(len(s) for s in samples))  # the threads below only read the RoPE tables
    keep = total_tokens * _act_bytes_per_token(spec) <= KEEP_BYTES
    tops: dict[tuple[int, GraphKind], _TopValues] = {}
    for layer in range(spec.n_layers):
        for kind, width in _widths(spec).items():
            n = total_tokens * width
            k = n - math.ceil(percentile / 100.0 * n) + 1
            stride = max(1, math.ceil(k / MAX_KEPT_VALUES))
            tops[(layer, kind)] = _TopValues(max(1, math.ceil(k / stride)), width, stride)
    kv = _KVRange(spec)
    out_max: dict[str, float] = {}
    out_clamped: dict[str, float] = {}
    damage = {key: 0.0 for key in tops}
    xs = [engine.weights.tok_embd[np.concatenate([np.asarray(s, np.int64) for s in b.samples])] for b in blocks]
    for layer in range(spec.n_layers):
        if progress:
            progress(STAGE, layer, spec.n_layers)
        acts: list[LayerActs | None] = []
        layer_in = list(xs)

        def forward(b: int, layer: int = layer) -> LayerActs:
            return float_layer(engine, layer, blocks[b], xs[b])

        for b, a in enumerate(pool.map(forward, len(blocks))):
            for c in blocks[b].chunks:  # in sample and chunk order, as the prefill of each sample
                for kind in GRAPH_KINDS:
                    tops[(layer, kind)].add(a.inputs[kind][c.row : c.row + c.n])
            for cache in a.caches:
                kv.add(cache, first_layer=layer)
            for name, value in a.output_max().items():
                out_max[f"{layer}/{name}"] = max(out_max.get(f"{layer}/{name}", 0.0), value)
            acts.append(a if keep else None)
            xs[b] = a.out
        clamps = {kind: tops[(layer, kind)].result(layer, kind).percentile_clamp for kind in GRAPH_KINDS}
        max_abs = {kind: max(tops[(layer, kind)].max_abs, 1e-8) for kind in GRAPH_KINDS}

        def probe(
            b: int,
            layer: int = layer,
            clamps: dict[GraphKind, float] = clamps,
            max_abs: dict[GraphKind, float] = max_abs,
            acts: list[LayerActs | None] = acts,
            layer_in: list[np.ndarray] = layer_in,
        ) -> tuple[dict[str, float], dict[GraphKind, list[float]]]:
            a = acts[b] or float_layer(engine, layer, blocks[b], layer_in[b])  # recomputed: the same values
            return probe_layer(engine, layer, blocks[b], a, clamps, max_abs)

        for clamped, sums in pool.map(probe, len(blocks)):
            for name, value in clamped.items():
                out_clamped[f"{layer}/{name}"] = max(out_clamped.get(f"{layer}/{name}", 0.0), value)
            for kind, per_chunk in sums.items():
                for value in per_chunk:  # chunk order: the same float64 sums as one chunk at a time
                    damage[(layer, kind)] += value
    if progress:
        progress(STAGE, spec.n_layers, spec.n_layers)
    inputs = [
        tops[(layer, kind)].result(layer, kind, damage[(layer, kind)] / max(1, total_tokens))
        for layer in range(spec.n_layers)
        for kind in GRAPH_KINDS
    ]
    digest = hashlib.sha256(np.concatenate([np.asarray(s, np.int64) for s in samples]).tobytes()).hexdigest()
    return ActivationStats(
        source=source, text_sha256=digest, samples=len(samples), tokens=total_tokens,
        scale_percentile=percentile, inputs=inputs, output_max=out_max, output_max_clamped=out_clamped,
        kv_absmax=kv.result(), seconds=time.perf_counter() - started,
    )  # fmt: skip


def _act_bytes_per_token(spec: ModelSpec) -> int:
    """Bytes of one token's `LayerActs` (inputs, outputs, residuals, K/V) of one layer."""
    return 4 * (7 * spec.hidden + 2 * spec.q_dim + 4 * spec.kv_dim + 3 * spec.ffn)


class _KVRange:
    """Running per-channel maxima of the KV cache: |v|, and for keys the norm of each channel's
    RoPE pair (see `KVAbsMax.keys`)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.rope_style = spec.rope_style
        self.keys = np.zeros((spec.n_layers, spec.n_kv_heads, spec.head_dim), np.float32)
        self.values = np.zeros_like(self.keys)

    def add(self, cache: KVCache, first_layer: int = 0) -> None:
        """The positions `cache` holds; its layers are the model's from `first_layer` on."""
        n = cache.length
        k, v = cache.k[:, :, :n], cache.v[:, :, :n]  # [layers, kv_heads, n, head_dim], float32
        layers = slice(first_layer, first_layer + k.shape[0])
        half = k.shape[-1] // 2
        if self.rope_style == "adjacent":  # pairs (2i, 2i+1)
            norms = np.sqrt(k[..., 0::2] ** 2 + k[..., 1::2] ** 2).max(axis=2)
            pair_max = np.repeat(norms, 2, axis=-1)
        else:  # "half": pairs (i, i + head_dim/2)
            norms = np.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2).max(axis=2)
            pair_max = np.concatenate([norms, norms], axis=-1)
        np.maximum(self.keys[layers], pair_max, out=self.keys[layers])
        np.maximum(self.values[layers], np.abs(v).max(axis=2), out=self.values[layers])

    def result(self) -> KVAbsMax:
        return KVAbsMax(keys=self.keys.tolist(), values=self.values.tolist())
