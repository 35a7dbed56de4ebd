"""What the rest of the pipeline knows about a model: its architecture and its float weights.

`ModelSpec` is read from file metadata alone (no weights), so the resolver can check a
profile against a model in milliseconds. `LlamaWeights` holds the float32 weights, all in
the (out, in) layout, so a linear is `y = x @ W.T`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt

F32Array: TypeAlias = npt.NDArray[np.float32]
ModelFormat = Literal["gguf", "hf", "card"]  # one GGUF file, a Hugging Face directory, or a card (no weights)
RopeStyle = Literal["adjacent", "half"]
Activation = Literal["silu", "gelu_tanh"]
LayerKind = Literal["global", "local"]
"""`global`: causal attention over every earlier token; `local`: over the last `sliding_window`."""
"""`adjacent`: rotate pairs (2i, 2i+1) — GGUF's permuted Q/K (ggml "normal" rope).
`half`: rotate (i, i + d/2) — Hugging Face checkpoints (NeoX style)."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a Llama-family decoder, from metadata only."""

    source: str  # the profile's model.source, as given
    path: str  # resolved file or directory
    format: ModelFormat
    architecture: str  # "llama", "qwen2", "mistral"
    name: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    context: int
    rope_theta: float
    rope_style: RopeStyle
    rms_eps: float
    tied_embeddings: bool
    qkv_bias: bool  # Qwen2 has q/k/v biases
    weight_bytes_f32: int  # float32 size of all weights
    file_bytes: int  # size on disk
    file_sha256: str | None = None  # filled when verified (builtin registry)
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    add_bos: bool = False
    chat_template: str | None = None  # the model's own Jinja template, if any
    extra: dict[str, object] = field(default_factory=dict)  # format-specific facts, for reports
    # -- family differences (model/architectures.py); the defaults are Llama's ---------------
    activation: Activation = "silu"  # of the gated MLP: SwiGLU (silu) or GeGLU (gelu_tanh)
    embedding_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(hidden))
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Gemma 3)
    sandwich_norms: bool = False  # RMSNorm after attention and after the MLP too (Gemma 2/3)
    layer_kinds: tuple[LayerKind, ...] = ()  # per layer; empty: every layer is "global"
    sliding_window: int | None = None  # keys a "local" layer's query sees, itself included
    local_rope_theta: float | None = None  # RoPE base of "local" layers (rope_theta: the global ones)
    attention_scale: float | None = None  # of q·k; None: 1/sqrt(head_dim)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) when set

    def layer_kind(self, layer: int) -> LayerKind:
        return self.layer_kinds[layer] if self.layer_kinds else "global"

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def kv_cache_bytes(self, tokens: int, dtype_bytes: int = 4) -> int:
        """K and V for every layer at `tokens` positions."""
        return 2 * self.n_layers * tokens * self.kv_dim * dtype_bytes

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear in one layer."""
        return {
            "attn_q": (self.q_dim, self.hidden),
            "attn_k": (self.kv_dim, self.hidden),
            "attn_v": (self.kv_dim, self.hidden),
            "attn_output": (self.hidden, self.q_dim),
            "ffn_gate": (self.ffn, self.hidden),
            "ffn_up": (self.ffn, self.hidden),
            "ffn_down": (self.hidden, self.ffn),
        }


@dataclass
class LayerWeights:
    """One transformer block, float32, linears (out, in)."""

    attn_norm: F32Array  # [hidden]
    wq: F32Array  # [n_heads*head_dim, hidden]
    wk: F32Array  # [n_kv_heads*head_dim, hidden]
    wv: F32Array  # [n_kv_heads*head_dim, hidden]
    wo: F32Array  # [hidden, n_heads*head_dim]
    ffn_norm: F32Array  # [hidden]
    w_gate: F32Array  # [ffn, hidden]
    w_up: F32Array  # [ffn, hidden]
    w_down: F32Array  # [hidden, ffn]
    bq: F32Array | None = None  # [n_heads*head_dim] (Qwen2)
    bk: F32Array | None = None  # [n_kv_heads*head_dim]
    bv: F32Array | None = None  # [n_kv_heads*head_dim]
    q_norm: F32Array | None = None  # [head_dim] (qk_norm)
    k_norm: F32Array | None = None  # [head_dim]
    post_attn_norm: F32Array | None = None  # [hidden] (sandwich_norms)
    post_ffn_norm: F32Array | None = None  # [hidden]


@dataclass
class LlamaWeights:
    """All float32 weights of a Llama-family model."""

    spec: ModelSpec
    tok_embd: F32Array  # [vocab, hidden]
    layers: list[LayerWeights]
    output_norm: F32Array  # [hidden]
    output: F32Array  # [vocab, hidden]; the same array as tok_embd when tied
