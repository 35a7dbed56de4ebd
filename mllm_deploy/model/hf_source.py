"""Llama-family models from Hugging Face directories: config.json + *.safetensors + tokenizer.json.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases). HF
checkpoints keep Q/K unpermuted, so RoPE rotates (i, i + d/2): rope_style "half".
Tensors may be F32, F16 or BF16 and sharded (`model.safetensors.index.json`); all load
as float32 (out, in). safetensors validates each header (a truncated file is refused);
BF16, which numpy lacks, is widened from the raw bytes at the header's offsets.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from mllm_deploy.errors import user_error
from mllm_deploy.model import layout
from mllm_deploy.model.spec import F32Array, LlamaWeights, ModelSpec

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}


def _read_json(path: Path, what: str) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise user_error(f"missing {path.name} ({what})", file=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise user_error(f"cannot read {path.name}: {exc}", file=str(path)) from None
    if not isinstance(data, dict):
        raise user_error(f"{path.name} must hold a JSON object", file=str(path))
    return data


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's shard files: from the index if there is one, else every *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise user_error("model.safetensors.index.json has no weight_map", file=str(index))
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise user_error(f"shard {f.name} listed in the index is missing", file=str(index))
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise user_error("no *.safetensors weights in the model directory", file=str(directory))
    return files


def _tensor_table(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (file, shape, dtype) from the safetensors headers (validated by safetensors)."""
    table: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="np") as handle:
                for name in handle.keys():  # noqa: SIM118 -- safe_open handles have keys() but are not iterable
                    sl = handle.get_slice(name)
                    table[name] = (f, tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as exc:
            raise user_error(f"corrupt or truncated safetensors file: {exc}", file=str(f)) from None
    return table


def _config_int(config: Mapping[str, object], key: str, file: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise user_error(f"config.json: '{key}' must be a positive integer", file=file, key=key, value=value)
    return value


def _config_float(config: Mapping[str, object], key: str, file: str, default: float) -> float:
    value = config.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise user_error(f"config.json: '{key}' must be a number", file=file, key=key, value=value)
    return float(value)


def read_hf_spec(directory: Path, source: str) -> ModelSpec:
    """The ModelSpec of a Hugging Face model directory, from its JSON files and tensor headers."""
    directory = Path(directory)
    config_path = directory / "config.json"
    file = str(config_path)
    config = _read_json(config_path, "a Hugging Face model directory needs config.json")
    names = config.get("architectures") or []
    arch_name = names[0] if isinstance(names, list) and names else config.get("model_type")
    if not isinstance(arch_name, str) or arch_name not in ARCHITECTURES:
        raise user_error(
            f"unsupported model architecture {arch_name!r}",
            file=file,
            key="architectures",
            allowed=", ".join(ARCHITECTURES),
        )
    arch = ARCHITECTURES[arch_name]
    scaling = config.get("rope_scaling") or {}
    if scaling and (not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "default"):
        raise user_error(
            "RoPE scaling is not supported", file=file, key="rope_scaling", value=str(config["rope_scaling"])
        )
    if config.get("hidden_act", "silu") != "silu":
        raise user_error(
            "only SiLU (SwiGLU) MLPs are supported", file=file, key="hidden_act", value=config.get("hidden_act")
        )
    if arch != "qwen2" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise user_error(
            "attention/MLP biases are not supported for this architecture", file=file, key="attention_bias"
        )
    if arch == "qwen2" and config.get("use_sliding_window"):
        raise user_error("Qwen2 sliding-window attention is not supported", file=file, key="use_sliding_window")

    hidden = _config_int(config, "hidden_size", file)
    n_heads = _config_int(config, "num_attention_heads", file)
    n_kv_heads = _config_int(config, "num_key_value_heads", file, n_heads)
    head_dim = (
        _config_int(config, "head_dim", file, hidden // n_heads)
        if config.get("head_dim") is not None
        else hidden // n_heads
    )
    if n_heads % n_kv_heads or head_dim % 2:
        raise user_error(f"invalid head layout: {n_heads} heads, {n_kv_heads} KV heads, head_dim {head_dim}", file=file)
    context = _config_int(config, "max_position_embeddings", file, 2048)
    window = config.get("sliding_window")
    if arch == "mistral" and isinstance(window, int) and 0 < window < context:
        context = window  # within the window, sliding-window attention equals full attention

    tok_json = directory / "tokenizer.json"
    if not tok_json.exists():
        raise user_error("missing tokenizer.json (the tokenizer is required to run the model)", file=str(tok_json))
    tok_config_path = directory / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path, "tokenizer settings") if tok_config_path.exists() else {}
    gen_config_path = directory / "generation_config.json"
    gen_config = _read_json(gen_config_path, "generation settings") if gen_config_path.exists() else {}

    files = safetensors_files(directory)
    table = _tensor_table(files)
    embd = table.get("model.embed_tokens.weight")
    vocab = embd[1][0] if embd and len(embd[1]) == 2 else _config_int(config, "vocab_size", file)
    tied = bool(config.get("tie_word_embeddings", False))
    eos_ids: list[int] = []
    for value in (gen_config.get("eos_token_id"), config.get("eos_token_id")):
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, int) and t not in eos_ids:
                eos_ids.append(t)
    bos = config.get("bos_token_id", gen_config.get("bos_token_id"))
    spec = ModelSpec(
        source=source,
        path=str(directory),
        format="hf",
        architecture=arch,
        name=str(config.get("_name_or_path") or directory.name),
        n_layers=_config_int(config, "num_hidden_layers", file),
        hidden=hidden,
        ffn=_config_int(config, "intermediate_size", file),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        context=context,
        rope_theta=_config_float(config, "rope_theta", file, 10000.0),
        rope_style="half",
        rms_eps=_config_float(config, "rms_norm_eps", file, 1e-6),
        tied_embeddings=tied,
        qkv_bias=arch == "qwen2",
        weight_bytes_f32=0,
        file_bytes=sum(f.stat().st_size for f in files),
        bos_id=bos if isinstance(bos, int) else None,
        eos_ids=tuple(eos_ids),
        add_bos=_adds_bos(tok_config, tok_json),
        chat_template=_hf_chat_template(directory, tok_config),
        extra={"torch_dtype": config.get("torch_dtype"), "safetensors_files": [f.name for f in files]},
    )
    found = {name: shape for name, (_, shape, _) in table.items()}
    ignored = {"lm_head.weight"} if tied else set()
    ignored |= {n for n in found if n.endswith("rotary_emb.inv_freq")}
    layout.check_tensor_table(spec, "hf", found, str(directory), ignored=ignored)
    for name in layout.expected_tensors(spec, "hf"):
        f, _, dtype = table[name]
        if dtype not in _DTYPES:
            raise user_error(f"tensor {name!r} has dtype {dtype}; supported: F32, F16, BF16", file=str(f))
    return replace(spec, weight_bytes_f32=layout.weight_bytes_f32(layout.expected_tensors(spec, "hf")))


def _adds_bos(tok_config: Mapping[str, object], tok_json: Path) -> bool:
    """Whether encoding a prompt starts with BOS: `add_bos_token`, else tokenizer.json's post-processor."""
    add_bos = tok_config.get("add_bos_token")
    if isinstance(add_bos, bool):
        return add_bos
    try:
        post = json.loads(tok_json.read_text(encoding="utf-8")).get("post_processor") or {}
    except (OSError, ValueError):
        raise user_error("tokenizer.json is not valid JSON", file=str(tok_json)) from None
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in processors:
        if proc.get("type") == "TemplateProcessing" and proc.get("single"):
            return "SpecialToken" in proc["single"][0]
    return False


def _hf_chat_template(directory: Path, tok_config: Mapping[str, object]) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _widen_bf16(path: Path, name: str) -> F32Array:
    """A BF16 tensor as float32, read from the raw bytes at its header offsets."""
    with open(path, "rb") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(header_len))
    entry = header[name]
    start, end = entry["data_offsets"]
    raw = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=8 + header_len + start)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def load_hf_weights(spec: ModelSpec) -> LlamaWeights:
    """Float32 weights (out, in) of a Hugging Face directory (fast enough to need no cache)."""
    files = safetensors_files(Path(spec.path))
    table = _tensor_table(files)
    handles = {}
    try:
        for f in files:
            handles[f] = safe_open(str(f), framework="np").__enter__()

        def read(name: str) -> F32Array:
            f, shape, dtype = table[name]
            try:
                arr = _widen_bf16(f, name) if dtype == "BF16" else handles[f].get_tensor(name)
            except (SafetensorError, OSError, ValueError) as exc:
                raise user_error(f"cannot read tensor {name!r}: {exc}", file=str(f)) from None
            return np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)

        return layout.assemble_weights(spec, "hf", read)
    except SafetensorError as exc:
        raise user_error(f"corrupt safetensors file: {exc}", file=spec.path) from None
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
