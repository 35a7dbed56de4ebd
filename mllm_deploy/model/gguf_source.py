"""Llama-family models (and the architectures of `model.architectures`) from GGUF files: metadata -> ModelSpec, tensors -> float32 LlamaWeights.

Conventions (llama.cpp): arch `llama` stores Q/K rows permuted so RoPE rotates adjacent
pairs (ggml "normal" rope) -> rope_style "adjacent"; arch `qwen2` is converted without
the permutation and run with NeoX rope -> rope_style "half". A model without
`output.weight` ties its output head to `token_embd.weight`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.model import layout, registry, weight_cache
from mllm_deploy.model.architectures import ARCHITECTURES
from mllm_deploy.model.gguf_file import GGUFFile
from mllm_deploy.model.gguf_on_demand import on_demand_weights
from mllm_deploy.model.gguf_trim import LINEARS_KEY, embedding_in_head, is_block_linear, is_trimmed
from mllm_deploy.model.spec import F32Array, LlamaWeights, ModelSpec

LOADER_VERSION = 1  # bump when the cached float32 arrays would differ
# metadata keys that describe variants the float engine would run wrongly
_UNSUPPORTED_KEYS = {
    "expert_count": "mixture-of-experts layers",
    "attention.sliding_window": "sliding-window attention",  # except in an architecture with a layer pattern
    "attn_logit_softcapping": "attention logit soft-capping",
}


def read_gguf_spec(path: Path, source: str) -> ModelSpec:
    """The ModelSpec of a GGUF file, from its header alone (~0.1 s for the default model;
    memoised per file identity, so repeated resolves in one process are free)."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, source)
    cached = _SPEC_MEMO.get(key)
    if cached is None:
        cached = _SPEC_MEMO[key] = _read_gguf_spec_uncached(path, source)
    return cached


_SPEC_MEMO: dict[tuple[str, int, int, str], ModelSpec] = {}  # (path, size, mtime_ns, source) -> spec


def _read_gguf_spec_uncached(path: Path, source: str) -> ModelSpec:
    gfile = GGUFFile(path)
    try:
        return _spec_from_file(gfile, source)
    finally:
        gfile.close()


def _spec_from_file(gfile: GGUFFile, source: str) -> ModelSpec:
    file = str(gfile.path)
    arch = gfile.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise user_error(
            f"unsupported model architecture {arch!r}",
            file=file,
            key="general.architecture",
            allowed=", ".join(ARCHITECTURES),
        )
    family = ARCHITECTURES[arch]

    def need(key: str, default: int | float | None = None) -> int | float:
        """The number at `{arch}.{key}`; `default` when it is absent (None: it is required)."""
        value = gfile.get(f"{arch}.{key}", default)
        if value is None:
            raise user_error(f"metadata key '{arch}.{key}' is missing", file=file)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise user_error(
                f"metadata key '{arch}.{key}' must be a number (per-layer values are not supported)", file=file
            )
        return value

    for key, what in _UNSUPPORTED_KEYS.items():
        if key == "attention.sliding_window" and family.global_every is not None:
            continue
        if gfile.get(f"{arch}.{key}"):
            raise user_error(f"{what} ('{arch}.{key}') are not supported", file=file)
    scaling = gfile.get(f"{arch}.rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in gfile.tensors:
        raise user_error("RoPE scaling (rope.scaling.type / rope_freqs.weight) is not supported", file=file)

    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    n_kv_heads = int(need("attention.head_count_kv", n_heads))
    head_dim = int(need("attention.key_length", hidden // max(n_heads, 1)))
    rope_dims = int(need("rope.dimension_count", head_dim))
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise user_error(f"invalid head counts: {n_heads} heads, {n_kv_heads} KV heads", file=file)
    if rope_dims != head_dim or head_dim % 2:
        raise user_error(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported", file=file)

    tokens = gfile.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise user_error("the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)", file=file)
    embd = gfile.tensors.get("token_embd.weight")
    vocab = int(need("vocab_size", len(tokens)))
    if embd is not None and len(embd.shape) == 2:
        vocab = embd.shape[0]
    elif (in_head := embedding_in_head(gfile)) is not None:  # a bundle's GGUF: the decode head holds it
        vocab = in_head.rows
    if len(tokens) > vocab:
        raise user_error(f"the tokenizer has {len(tokens)} tokens but the embedding only {vocab} rows", file=file)

    eos = _token_id(gfile, "tokenizer.ggml.eos_token_id")
    eot = _token_id(gfile, "tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(t for t in (eos, eot) if t is not None))
    bos = _token_id(gfile, "tokenizer.ggml.bos_token_id")
    template = gfile.get("tokenizer.chat_template")
    n_layers = int(need("block_count"))
    window = gfile.get(f"{arch}.attention.sliding_window")
    window = int(window) if isinstance(window, (int, float)) and window > 0 else None
    softcap = gfile.get(f"{arch}.final_logit_softcapping")
    spec = ModelSpec(
        source=source,
        path=file,
        format="gguf",
        architecture=arch,
        name=str(gfile.get("general.name") or gfile.path.stem),
        n_layers=n_layers,
        hidden=hidden,
        ffn=int(need("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        context=int(need("context_length")),
        rope_theta=float(need("rope.freq_base", 10000.0)),
        rope_style=family.rope_style_gguf,
        rms_eps=float(need("attention.layer_norm_rms_epsilon")),
        tied_embeddings="output.weight" not in gfile.tensors,
        qkv_bias="blk.0.attn_q.bias" in gfile.tensors,
        weight_bytes_f32=0,
        file_bytes=gfile.file_bytes,
        bos_id=bos,
        eos_ids=eos_ids,
        add_bos=bool(gfile.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=template if isinstance(template, str) else None,
        extra={
            "tokenizer_model": gfile.get("tokenizer.ggml.model"),
            "tokenizer_pre": gfile.get("tokenizer.ggml.pre"),
            "tensor_types": _type_histogram(gfile),
        },
        activation=family.activation,
        embedding_scale=float(hidden) ** 0.5 if family.scale_embeddings else 1.0,
        qk_norm=family.qk_norm,
        sandwich_norms=family.sandwich_norms,
        layer_kinds=family.layer_kinds(n_layers, window),
        sliding_window=window if family.global_every is not None else None,
        local_rope_theta=family.local_rope_theta,
        attention_scale=family.query_pre_attn_scalar**-0.5 if family.query_pre_attn_scalar else None,
        final_logit_softcap=float(softcap) if isinstance(softcap, (int, float)) and softcap > 0 else None,
    )
    found = {name: info.shape for name, info in gfile.tensors.items()}
    if is_trimmed(gfile):  # a bundle's model: its block linears are in the bundle's graphs (gguf_trim)
        expected = layout.expected_tensors(spec, "gguf")
        found |= {name: shape for name, shape in expected.items() if is_block_linear(name) and name not in found}
        if embedding_in_head(gfile) is not None:  # ... and its embedding in the decode head's weights
            found.setdefault("token_embd.weight", expected["token_embd.weight"])
    layout.check_tensor_table(spec, "gguf", found, file)
    return replace(spec, weight_bytes_f32=layout.weight_bytes_f32(layout.expected_tensors(spec, "gguf")))


def _token_id(gfile: GGUFFile, key: str) -> int | None:
    """The token id at metadata `key`, or None when the file has none."""
    value = gfile.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise user_error(f"metadata key '{key}' must be a token id (an integer)", file=str(gfile.path), value=value)
    return value


def _type_histogram(gfile: GGUFFile) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in gfile.tensors.values():
        counts[info.ggml_type.name] = counts.get(info.ggml_type.name, 0) + 1
    return counts


def gguf_weights_cache_key(spec: ModelSpec) -> str:
    """Keyed by the file's content: the registry's verified hash for a builtin, else its sha256
    (remembered per path, size and mtime), so a copy of a model finds the same entry instead of
    writing another 515 MB one."""
    digest = spec.file_sha256 or registry.verified_sha256(Path(spec.path))
    return "gguf-" + weight_cache.cache_key("sha256", digest, "loader", LOADER_VERSION)


def load_gguf_weights(spec: ModelSpec, *, use_cache: bool = True, on_demand: bool = False) -> LlamaWeights:
    """Float32 weights (out, in); dequantized once, then mmap-loaded from the weight cache.
    `on_demand`: nothing is cached or dequantized up front (see `gguf_on_demand`)."""
    names = list(layout.expected_tensors(spec, "gguf"))
    key = gguf_weights_cache_key(spec) if use_cache and not on_demand else None
    if key is not None:
        cached = weight_cache.load_entry(key)
        if cached is not None and set(cached) == set(names):
            return layout.assemble_weights(spec, "gguf", cached.__getitem__)
        if cached is not None:  # an entry for other tensors under this key: replace it
            weight_cache.drop_entry(key)
    gfile = GGUFFile(Path(spec.path))
    try:
        if _spec_from_file(gfile, spec.source).weight_bytes_f32 != spec.weight_bytes_f32:
            raise user_error("the file changed since its spec was read; read it again", file=spec.path)
        if on_demand:
            return on_demand_weights(spec, gfile)
        if is_trimmed(gfile):
            raise user_error(
                "this GGUF was trimmed for a bundle: its blocks' linear weights are in the bundle's graphs, "
                "not in the file", file=spec.path, key=LINEARS_KEY,
                hint="run the bundle directory it came from (mllm-deploy run BUNDLE), or use the original model",
                exit_code=ExitCode.CANNOT_RUN,
            )  # fmt: skip
        if key is None:
            return layout.assemble_weights(spec, "gguf", gfile.dequantize)
        try:
            weight_cache.store_entry(
                key, names, gfile.dequantize,
                {"source": spec.source, "path": spec.path, "loader_version": LOADER_VERSION},
            )  # fmt: skip
            cached = weight_cache.load_entry(key)
        except OSError:  # the cache directory is unusable (read-only, full disk): run from memory
            cached = None
        if cached is None:
            return layout.assemble_weights(spec, "gguf", gfile.dequantize)
        return layout.assemble_weights(spec, "gguf", cached.__getitem__)
    finally:
        if not on_demand:  # on demand, the weights read from the open file as long as they live
            gfile.close()


def gguf_tensor(spec: ModelSpec, name: str) -> F32Array:
    """One tensor as float32, straight from the file (no cache); for tools and tests."""
    gfile = GGUFFile(Path(spec.path))
    try:
        if name not in gfile.tensors:
            raise user_error(f"no tensor named {name!r}", file=spec.path)
        return gfile.dequantize(name)
    finally:
        gfile.close()
