"""The tensors of a Llama-family model: names in each format, expected shapes, assembly.

Both loaders check names and shapes against this table when they read the spec (so a
missing tensor or a wrong shape is refused in milliseconds, before any weight is read) and
assemble `LlamaWeights` through `assemble_weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from mllm_deploy.errors import user_error
from mllm_deploy.model.spec import F32Array, LayerWeights, LlamaWeights, ModelFormat, ModelSpec

# LayerWeights field -> (GGUF name after "blk.{i}.", HF name after "model.layers.{i}.")
LAYER_TENSORS: dict[str, tuple[str, str]] = {
    "attn_norm": ("attn_norm.weight", "input_layernorm.weight"),
    "wq": ("attn_q.weight", "self_attn.q_proj.weight"),
    "wk": ("attn_k.weight", "self_attn.k_proj.weight"),
    "wv": ("attn_v.weight", "self_attn.v_proj.weight"),
    "wo": ("attn_output.weight", "self_attn.o_proj.weight"),
    "ffn_norm": ("ffn_norm.weight", "post_attention_layernorm.weight"),
    "w_gate": ("ffn_gate.weight", "mlp.gate_proj.weight"),
    "w_up": ("ffn_up.weight", "mlp.up_proj.weight"),
    "w_down": ("ffn_down.weight", "mlp.down_proj.weight"),
}
BIAS_TENSORS: dict[str, tuple[str, str]] = {
    "bq": ("attn_q.bias", "self_attn.q_proj.bias"),
    "bk": ("attn_k.bias", "self_attn.k_proj.bias"),
    "bv": ("attn_v.bias", "self_attn.v_proj.bias"),
}
QK_NORM_TENSORS: dict[str, tuple[str, str]] = {
    "q_norm": ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    "k_norm": ("attn_k_norm.weight", "self_attn.k_norm.weight"),
}
SANDWICH_NORM_TENSORS: dict[str, tuple[str, str]] = {  # Gemma 2/3: ffn_norm is HF's pre_feedforward_layernorm
    "post_attn_norm": ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    "post_ffn_norm": ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
}
# global tensors: key -> (GGUF name, HF name)
GLOBAL_TENSORS: dict[str, tuple[str, str]] = {
    "tok_embd": ("token_embd.weight", "model.embed_tokens.weight"),
    "output_norm": ("output_norm.weight", "model.norm.weight"),
    "output": ("output.weight", "lm_head.weight"),
}


def field_shape(spec: ModelSpec, field: str) -> tuple[int, ...]:
    """Expected numpy shape of a LayerWeights field or a global tensor key."""
    linears = spec.linear_shapes()
    by_field = {
        "wq": linears["attn_q"], "wk": linears["attn_k"], "wv": linears["attn_v"],
        "wo": linears["attn_output"], "w_gate": linears["ffn_gate"], "w_up": linears["ffn_up"],
        "w_down": linears["ffn_down"],
        "attn_norm": (spec.hidden,), "ffn_norm": (spec.hidden,), "output_norm": (spec.hidden,),
        "bq": (spec.q_dim,), "bk": (spec.kv_dim,), "bv": (spec.kv_dim,),
        "q_norm": (spec.head_dim,), "k_norm": (spec.head_dim,),
        "post_attn_norm": (spec.hidden,), "post_ffn_norm": (spec.hidden,),
        "tok_embd": (spec.vocab, spec.hidden), "output": (spec.vocab, spec.hidden),
    }  # fmt: skip
    return by_field[field]


def optional_layer_tensors(spec: ModelSpec) -> dict[str, tuple[str, str]]:
    """LAYER_TENSORS plus the per-layer tensors the spec's family has (biases, QK norms, sandwich norms)."""
    per_layer = dict(LAYER_TENSORS)
    if spec.qkv_bias:
        per_layer.update(BIAS_TENSORS)
    if spec.qk_norm:
        per_layer.update(QK_NORM_TENSORS)
    if spec.sandwich_norms:
        per_layer.update(SANDWICH_NORM_TENSORS)
    return per_layer


def expected_tensors(spec: ModelSpec, fmt: ModelFormat) -> dict[str, tuple[int, ...]]:
    """Every tensor name the model must have in format `fmt` ("gguf"/"hf") -> numpy shape."""
    col = 0 if fmt == "gguf" else 1
    prefix = "blk.{i}." if fmt == "gguf" else "model.layers.{i}."
    out: dict[str, tuple[int, ...]] = {}
    for key, names in GLOBAL_TENSORS.items():
        if key == "output" and spec.tied_embeddings:
            continue
        out[names[col]] = field_shape(spec, key)
    per_layer = optional_layer_tensors(spec)
    for i in range(spec.n_layers):
        for field, names in per_layer.items():
            out[prefix.format(i=i) + names[col]] = field_shape(spec, field)
    return out


def check_tensor_table(
    spec: ModelSpec,
    fmt: ModelFormat,
    found: dict[str, tuple[int, ...]],
    file: str,
    *,
    ignored: Collection[str] = frozenset(),
) -> None:
    """Refuse missing tensors, wrong shapes and unknown tensors (a variant we would run wrongly)."""
    expected = expected_tensors(spec, fmt)
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise user_error(f"missing tensors: {', '.join(missing[:3])}{more}", file=file)
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise user_error(
                f"tensor {name!r} has shape {tuple(found[name])}, expected {shape} from the model's metadata",
                file=file,
            )
    unknown = sorted(set(found) - set(expected) - set(ignored))
    if unknown:
        raise user_error(
            f"unsupported tensors for a {spec.architecture} model: {', '.join(unknown[:3])}"
            + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            + " (this variant of the architecture is not supported)",
            file=file,
        )


def assemble_weights(spec: ModelSpec, fmt: ModelFormat, read: Callable[[str], F32Array]) -> LlamaWeights:
    """Build LlamaWeights, calling `read(name)` (float32, numpy shape) for each tensor."""
    col = 0 if fmt == "gguf" else 1
    prefix = "blk.{i}." if fmt == "gguf" else "model.layers.{i}."
    tok_embd = read(GLOBAL_TENSORS["tok_embd"][col])
    layers = []
    for i in range(spec.n_layers):
        fields = {f: read(prefix.format(i=i) + names[col]) for f, names in optional_layer_tensors(spec).items()}
        layers.append(LayerWeights(**fields))
    output_norm = read(GLOBAL_TENSORS["output_norm"][col])
    output = tok_embd if spec.tied_embeddings else read(GLOBAL_TENSORS["output"][col])
    return LlamaWeights(spec=spec, tok_embd=tok_embd, layers=layers, output_norm=output_norm, output=output)


def weight_bytes_f32(spec_shapes: dict[str, tuple[int, ...]]) -> int:
    return 4 * sum(int(np.prod(s)) for s in spec_shapes.values())
