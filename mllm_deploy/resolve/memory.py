"""Memory each processor needs for a profile and model, computed from shapes alone."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from mllm_deploy.model.linears import LINEAR_GROUPS
from mllm_deploy.model.spec import ModelSpec
from mllm_deploy.profile.models import Profile

F32 = 4
HEAD_BLOCK = 32
"""Values per 8-bit block of the decode graphs' output head, whatever `decode.weight_block` says:
llama.cpp's Q8_0 block, so a GGUF's Q8_0 tied embedding is held exactly (`compile.decode_graphs`)."""


class MemoryBudget(BaseModel):
    """Bytes per processor. On phones and on the host both processors share the same DRAM,
    so `total_bytes` is what must fit in RAM."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    npu_weight_bytes: int
    """INT8 weights and their scales for every NPU graph (one graph per layer, shared by all chunks)."""

    npu_activation_bytes: int
    """Largest set of NPU graph inputs and outputs alive at once (one chunk)."""

    cpu_weight_bytes: int
    """Float32 weights kept on the CPU: embeddings, norms, the output head when on the CPU,
    the linears when the CPU runs them (backend `none`, decode), hot-channel shadow rows."""

    kv_cache_bytes: int
    """K and V for every layer at `prefill.max_context` positions, in `kv_cache_dtype`."""

    kv_cache_dtype: Literal["int8", "float32"]
    """Storage of the KV cache: `decode.kv_cache` on the NPU path, float32 on the float baseline."""

    cpu_activation_bytes: int
    """CPU working set for one chunk: attention scores against the whole context and
    the float activations around the NPU graphs."""

    shadow_hot_bytes: int
    """Float32 weight rows of hot channels kept in memory for shadow outlier correction
    (included in `cpu_weight_bytes`)."""

    decode_weight_bytes: int
    """Weight blocks, their float32 scales (and 4-bit blocks' offsets) of the CPU decode graphs (one
    step graph and the output head, `decode.weight_block` values of `decode.weight_bits` per block) on the NPU path (included in
    `cpu_weight_bytes`). onnxruntime's prepacked copy comes on top when they are opened: measured
    1.4x these bytes resident for the default model."""

    @property
    def npu_bytes(self) -> int:
        return self.npu_weight_bytes + self.npu_activation_bytes

    @property
    def cpu_bytes(self) -> int:
        return self.cpu_weight_bytes + self.kv_cache_bytes + self.cpu_activation_bytes

    @property
    def total_bytes(self) -> int:
        return self.npu_bytes + self.cpu_bytes


def linear_params_per_layer(spec: ModelSpec) -> int:
    return sum(out * inp for out, inp in spec.linear_shapes().values())


LINEAR_INPUTS_PER_LAYER = len(LINEAR_GROUPS)  # one input per graph kind (qkv, o_proj, gate_up, down)


def shadowed_input_count(profile: Profile, spec: ModelSpec) -> int:
    """Linear inputs (over all layers) that keep shadow outlier correction after pruning the
    least important `outliers.prune_fraction` of them."""
    if profile.outliers.policy != "shadow":
        return 0
    total = LINEAR_INPUTS_PER_LAYER * spec.n_layers
    return total - round(profile.outliers.prune_fraction * total)


def decode_weight_bytes(spec: ModelSpec, block: int, bits: int = 8) -> int:
    """Bytes of the decode graphs' weights: every layer's linears in blocks of `block` values of
    `bits` bits (a row's last block padded) with one float32 scale per block, and for 4 bits one
    float32 offset per block too; the output head in 8-bit blocks of 32 whatever `bits` and `block`
    say (`compile.decode_graphs.head_bits`, `HEAD_BLOCK`)."""

    def blocked(out: int, inp: int, bits: int, block: int = block) -> int:
        return out * -(-inp // block) * (block * bits // 8 + F32 + (F32 if bits == 4 else 0))

    layers = sum(blocked(out, inp, bits) for out, inp in spec.linear_shapes().values()) * spec.n_layers
    return layers + blocked(spec.vocab, spec.hidden, 8, HEAD_BLOCK)


def memory_budget(profile: Profile, spec: ModelSpec, backend: str) -> MemoryBudget:
    """Memory per processor for `profile` on `spec` with the resolved `backend`."""
    chunk = profile.prefill.chunk_size
    ctx = profile.prefill.max_context
    per_layer = linear_params_per_layer(spec)
    linears = per_layer * spec.n_layers
    embed = spec.vocab * spec.hidden * F32
    head = 0 if spec.tied_embeddings else spec.vocab * spec.hidden * F32
    norms = (2 * spec.n_layers + 1) * spec.hidden * F32
    # the NPU path keeps an int8 KV cache unless decode.kv_cache = "float32"; the float baseline float32
    kv_dtype = profile.decode.kv_cache if backend != "none" else "float32"
    kv = spec.kv_cache_bytes(ctx, 1 if kv_dtype == "int8" else F32)
    widest = max(spec.ffn, spec.q_dim + 2 * spec.kv_dim, spec.hidden)
    # attention scores [heads, chunk, ctx] + float activations around the graphs [chunk, widest] x 4
    cpu_act = spec.n_heads * chunk * ctx * F32 + 4 * chunk * widest * F32

    if backend == "none":
        return MemoryBudget(
            npu_weight_bytes=0,
            npu_activation_bytes=0,
            cpu_weight_bytes=embed + head + norms + linears * F32,
            kv_cache_bytes=kv,
            kv_cache_dtype=kv_dtype,
            cpu_activation_bytes=cpu_act,
            shadow_hot_bytes=0,
            decode_weight_bytes=0,  # the float baseline decodes with its float32 linears
        )

    per_channel = profile.quantization.weights == "int8-per-channel"
    scales = sum(out if per_channel else 1 for out, _ in spec.linear_shapes().values()) * F32 * spec.n_layers
    npu_weights = linears + scales
    if profile.placement.lm_head == "npu":
        npu_weights += spec.vocab * spec.hidden + (spec.vocab if per_channel else 1) * F32
        head = 0
    act_bytes = 2 if profile.quantization.activations == "uint16" else 1
    # graph I/O for the widest graph (gate/up: in [chunk, hidden], out [chunk, ffn] float)
    npu_act = chunk * (spec.hidden + 2 * spec.ffn) * F32 + chunk * spec.ffn * act_bytes
    # hot rows: for each shadowed linear input channel kept hot, the float row of W^T it multiplies;
    # sized for the widest input (the down projection's), which calibration shadows first
    hot_fraction = profile.outliers.hot_channel_fraction
    widest_out, widest_in = max(spec.linear_shapes().values(), key=lambda shape: shape[1])
    hot = shadowed_input_count(profile, spec) * round(hot_fraction * widest_in) * widest_out * F32
    # decode runs on the CPU from its own 8-bit graphs (built from the float weights, cached)
    decode = decode_weight_bytes(spec, profile.decode.weight_block, profile.decode.weight_bits)
    return MemoryBudget(
        npu_weight_bytes=npu_weights,
        npu_activation_bytes=npu_act,
        cpu_weight_bytes=embed + head + norms + hot + decode,
        kv_cache_bytes=kv,
        kv_cache_dtype=kv_dtype,
        cpu_activation_bytes=cpu_act,
        shadow_hot_bytes=hot,
        decode_weight_bytes=decode,
    )
