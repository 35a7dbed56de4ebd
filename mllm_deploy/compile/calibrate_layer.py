"""One layer of the calibration statistics over a block of whole samples.

    acts = float_layer(engine, layer, block, x)          # the float layer, every linear's input and output
    clamped, damage = probe_layer(engine, layer, block, acts, clamps, max_abs)

`float_layer` runs layer `layer` of the float model on the block's rows `x` [rows, hidden] (its
samples' tokens, one after the other) exactly as `FloatEngine.block` runs each chunk of
`chunk_size` tokens: the linears over all rows at once, attention chunk by chunk over each
sample's own KV cache of this layer. `probe_layer`, once the whole calibration set has been
through the layer (the percentile clamps and max |x| are over every sample), computes for each
linear output the max |y| with its input clamped, and for each linear input the grid damage:
the layer again with only that input on its max-abs uint8 grid, |h' - h|² / |h|² summed per
chunk. A probe recomputes only what its input changes (the o_proj probe reuses the float
attention, the gate_up and down probes the float residual after attention), which is what the
full block would compute for the unchanged parts, value for value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mllm_deploy.compile.quantize import activation_quant_symmetric
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.forward.kv_cache import KVCache
from mllm_deploy.forward.layers import ChunkSpan, FloatBlockLinears, rms_norm, silu_mul_
from mllm_deploy.model.linears import GRAPH_KINDS, LINEAR_GROUP, GraphKind
from mllm_deploy.model.spec import LayerWeights


def check_plain_blocks(engine: FloatEngine) -> None:
    """Calibration re-runs the pieces of a plain Llama-family block (the NPU path's): refuse a model
    whose blocks have more (QK-norm, sandwich norms, sliding windows, attention or logit scaling)."""
    spec = engine.spec
    extras = [name for name in ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")
              if any(getattr(w, name, None) is not None for w in engine.weights.layers)]  # fmt: skip
    extras += [name for name in ("sliding_window", "attention_scale", "final_logit_softcap")
               if getattr(spec, name, None) is not None]  # fmt: skip
    if extras:
        raise NotImplementedError(f"calibration of blocks with {', '.join(extras)} (only plain Llama-family blocks)")


@dataclass(frozen=True)
class Chunk:
    """One chunk of a sample, as `FloatEngine.prefill` would run it."""

    sample: int  # index in the block
    row: int  # first row in the block's arrays
    start: int  # position of its first token in the sample
    n: int  # tokens


@dataclass(frozen=True)
class Block:
    """Whole samples whose rows the layer functions process together."""

    samples: Sequence[Sequence[int]]
    chunk_size: int
    chunks: list[Chunk] = field(init=False)
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        chunks, row = [], 0
        for s, ids in enumerate(self.samples):
            for start in range(0, len(ids), self.chunk_size):
                n = min(self.chunk_size, len(ids) - start)
                chunks.append(Chunk(s, row, start, n))
                row += n
        object.__setattr__(self, "chunks", chunks)
        object.__setattr__(self, "rows", row)

    def of_sample(self, sample: int) -> list[Chunk]:
        return [c for c in self.chunks if c.sample == sample]


@dataclass
class LayerActs:
    """The float layer on a block's rows."""

    x: np.ndarray  # [rows, hidden] the residual stream into the layer
    inputs: dict[GraphKind, np.ndarray]  # each graph's input: x_norm, attention output, h_norm, silu(gate)·up
    outputs: dict[str, np.ndarray]  # each linear's float output (linear name -> [rows, out], biases included)
    after_attention: np.ndarray  # [rows, hidden] x + o_proj(attention)
    out: np.ndarray  # [rows, hidden] the residual stream out of the layer
    caches: list[KVCache]  # per sample: this layer's K/V (one-layer caches)

    def output_max(self) -> dict[str, float]:
        """Max |y| of each linear's float output over the block."""
        return {name: float(np.abs(y).max()) for name, y in self.outputs.items()}


def float_layer(engine: FloatEngine, layer: int, block: Block, x: np.ndarray) -> LayerActs:
    """The float layer `layer` on the block's rows x [rows, hidden] (see the module docstring)."""
    spec, w = engine.spec, engine.weights.layers[layer]
    x_norm = rms_norm(x, w.attn_norm, spec.rms_eps)  # [rows, hidden]
    q, k, v = FloatBlockLinears(w).qkv(x_norm)  # [rows, q_dim], [rows, kv_dim] x2
    caches = [KVCache(1, len(ids), spec.n_kv_heads, spec.head_dim) for ids in block.samples]
    attn = _attention(engine, block, caches, q, k, v)  # [rows, q_dim]
    o = attn @ w.wo.T  # [rows, hidden]
    h1 = x + o
    h_norm = rms_norm(h1, w.ffn_norm, spec.rms_eps)
    gate, up = h_norm @ w.w_gate.T, h_norm @ w.w_up.T  # [rows, ffn]
    h = silu_mul_(gate.copy(), up)
    down = h @ w.w_down.T  # [rows, hidden]
    return LayerActs(
        x=x,
        inputs={"qkv": x_norm, "o_proj": attn, "gate_up": h_norm, "down": h},
        outputs=dict(attn_q=q, attn_k=k, attn_v=v, attn_output=o, ffn_gate=gate, ffn_up=up, ffn_down=down),
        after_attention=h1,
        out=h1 + down,
        caches=caches,
    )


def _attention(
    engine: FloatEngine,
    block: Block,
    caches: list[KVCache],
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    restore: list[KVCache] | None = None,
) -> np.ndarray:
    """Attention of every chunk over its sample's one-layer cache (rope, write, attend, as
    `FloatEngine.attention_step`). With `restore`, each chunk's K/V rows are then replaced by those
    of the `restore` caches: a probe's chunk attends to the float K/V of the chunks before it."""
    attn = np.empty_like(q)  # [rows, q_dim]
    for c in block.chunks:
        rows = slice(c.row, c.row + c.n)
        cache = caches[c.sample]
        attn[rows] = engine.attention_step(0, q[rows], k[rows], v[rows], ChunkSpan(c.start, c.n, c.n), cache)
        if restore is not None:
            held = restore[c.sample]
            end = c.start + c.n
            cache.store(0, c.start, held.k[0, :, c.start : end].transpose(1, 0, 2),
                        held.v[0, :, c.start : end].transpose(1, 0, 2))  # fmt: skip
        cache.advance(list(block.samples[c.sample][c.start : c.start + c.n]))
    return attn


def probe_layer(
    engine: FloatEngine,
    layer: int,
    block: Block,
    acts: LayerActs,
    clamps: dict[GraphKind, float],
    max_abs: dict[GraphKind, float],
) -> tuple[dict[str, float], dict[GraphKind, list[float]]]:
    """(linear name -> max |y| with its input clamped to ±clamp, graph kind -> per chunk the sum over
    its tokens of |h' - h|² / |h|² with that input on its max-abs uint8 grid)."""
    return _clamped_output_max(engine.weights.layers[layer], block, acts, clamps), {
        kind: _grid_damage(engine, layer, block, acts, kind, max_abs[kind]) for kind in GRAPH_KINDS
    }


def _clamped_output_max(
    w: LayerWeights, block: Block, acts: LayerActs, clamps: dict[GraphKind, float]
) -> dict[str, float]:
    """Per chunk, as the NPU computes it: y - (x - clip(x)) @ W.T over the channels beyond the clamp."""
    result: dict[str, float] = {}
    for kind in GRAPH_KINDS:
        group, c = LINEAR_GROUP[kind], clamps[kind]
        for chunk in block.chunks:
            rows = slice(chunk.row, chunk.row + chunk.n)
            x = acts.inputs[kind][rows]  # [T, in]
            channels = np.unique(np.nonzero(np.abs(x) > c)[1])
            r = x[:, channels] - np.clip(x[:, channels], -c, c)  # [T, n_outlier_channels]
            for name, weight in zip(group.linears, group.weight_arrays(w), strict=True):
                y = acts.outputs[name][rows]  # [T, out]
                if channels.size:
                    y = y - r @ np.asarray(weight)[:, channels].T
                result[name] = max(result.get(name, 0.0), float(np.abs(y).max()))
    return result


def _grid_damage(
    engine: FloatEngine, layer: int, block: Block, acts: LayerActs, kind: GraphKind, max_abs: float
) -> list[float]:
    """Per chunk: Σ over its tokens of |h' - h|² / |h|², h' the layer's output with only `kind`'s
    input on its max-abs uint8 grid (what a pruned input gets)."""
    spec, w = engine.spec, engine.weights.layers[layer]
    fq = activation_quant_symmetric(max_abs, "uint8").fake_quantize
    h: np.ndarray  # [rows, hidden] the layer's output with the probed input
    if kind == "down":
        h = acts.after_attention + fq(acts.inputs["down"]) @ w.w_down.T
    elif kind == "gate_up":
        x_norm = fq(acts.inputs["gate_up"])
        h = acts.after_attention + silu_mul_(x_norm @ w.w_gate.T, x_norm @ w.w_up.T) @ w.w_down.T
    else:  # qkv or o_proj: a new residual after attention, and the whole MLP on it
        if kind == "qkv":
            q, k, v = FloatBlockLinears(w).qkv(fq(acts.inputs["qkv"]))
            probes = [KVCache(1, len(ids), spec.n_kv_heads, spec.head_dim) for ids in block.samples]
            after_attention = acts.x + _attention(engine, block, probes, q, k, v, restore=acts.caches) @ w.wo.T
        else:
            after_attention = acts.x + fq(acts.inputs["o_proj"]) @ w.wo.T
        h_norm = rms_norm(after_attention, w.ffn_norm, spec.rms_eps)
        h = after_attention + silu_mul_(h_norm @ w.w_gate.T, h_norm @ w.w_up.T) @ w.w_down.T
    ref = acts.out
    d = h - ref
    per_token: np.ndarray = np.einsum("td,td->t", d, d, dtype=np.float64) / (
        np.einsum("td,td->t", ref, ref, dtype=np.float64) + 1e-30
    )  # [rows]
    return [float(per_token[c.row : c.row + c.n].sum()) for c in block.chunks]
