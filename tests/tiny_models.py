"""Tiny random Llama-family models, written as real GGUF files and Hugging Face directories.

Every builder is deterministic (seeded numpy, a BPE trained on a fixed corpus), so tests can
compare loaders and engines across formats: the GGUF and the HF form of one seed hold the
same weights — GGUF with Q/K permuted the way llama.cpp's converter stores them (for
adjacent-pair RoPE), HF unpermuted (half-split RoPE) — and must give the same logits.

    write_tiny_gguf(dir, seed=0, tied=True, weight_type="F32") -> Path  (the .gguf file)
    write_tiny_hf(dir, arch="llama", seed=0, tied=True, dtype="F32") -> Path  (the directory)
    tiny_hf_weights(arch, seed, tied) -> {hf_name: float32 array}   (the ground truth)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


@dataclass(frozen=True)
class TinyConfig:
    n_layers: int = 2
    hidden: int = 64
    ffn: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    context: int = 256
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


TINY = TinyConfig()
# hidden 32, two query heads sharing one KV head, context 128: the NPU build (calibrate, compile,
# audit) and eval run on it in seconds
SMALLEST = TinyConfig(n_layers=2, hidden=32, ffn=64, n_heads=2, n_kv_heads=1, context=128)
# three layers: the DAG prefill and the NPU path interleave layers of several chunks
THREE_LAYERS = TinyConfig(n_layers=3)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
BOS_ID, EOS_ID = 1, 2
TINY_VOCAB_TARGET = 384

# ChatML, written for these tests (the shape SmolLM2 and Qwen2 use).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tiny BPE: enough English, code and digits for a few hundred merges.
_CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "What is the capital of France? It is Paris, on the river Seine.",
    "def forward(self, x):\n    return self.linear(x) + self.bias\n",
    "for i in range(10):\n    print(i * 2, i ** 2)\n",
    "In 2024 the model processed 1234567 tokens in 89 seconds.",
    "Hello world! Hello there, how are you today? I am fine, thank you.",
    "the quick brown fox jumps over the lazy dog; THE QUICK BROWN FOX.",
    "Attention is all you need. Prefill is compute bound, decode is memory bound.",
    "Café, naïve, résumé, déjà vu — accents everywhere.",
    "import numpy as np\narray = np.zeros((4, 8), dtype=np.float32)\n",
]


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_TARGET,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> Tokenizer:
    """The tiny byte-level BPE (SmolLM-style pre-tokenizer: single digits, then GPT-2 regex)."""
    return Tokenizer.from_str(_tiny_tokenizer_json())


def tiny_vocab() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as "a b" strings) of the tiny BPE."""
    model = json.loads(_tiny_tokenizer_json())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in by_id], merges


def tiny_vocab_size() -> int:
    return len(tiny_vocab()[0])


def tiny_hf_weights(
    arch: str = "llama", seed: int = 0, tied: bool = True, cfg: TinyConfig = TINY
) -> dict[str, np.ndarray]:
    """Float32 weights in Hugging Face names and layout (linears (out, in), q/k unpermuted)."""
    rng = np.random.default_rng(seed)
    vocab, h, f, hd = tiny_vocab_size(), cfg.hidden, cfg.ffn, cfg.head_dim
    q_dim, kv_dim = cfg.n_heads * hd, cfg.n_kv_heads * hd

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm(dim: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((vocab, h)).astype(np.float32)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = linear(q_dim, h)
        w[p + "self_attn.k_proj.weight"] = linear(kv_dim, h)
        w[p + "self_attn.v_proj.weight"] = linear(kv_dim, h)
        if arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = (0.1 * rng.standard_normal(q_dim)).astype(np.float32)
            w[p + "self_attn.k_proj.bias"] = (0.1 * rng.standard_normal(kv_dim)).astype(np.float32)
            w[p + "self_attn.v_proj.bias"] = (0.1 * rng.standard_normal(kv_dim)).astype(np.float32)
        w[p + "self_attn.o_proj.weight"] = linear(h, q_dim)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = linear(f, h)
        w[p + "mlp.up_proj.weight"] = linear(f, h)
        w[p + "mlp.down_proj.weight"] = linear(h, f)
    w["model.norm.weight"] = norm(h)
    if not tied:
        w["lm_head.weight"] = linear(vocab, h)
    return w


def permute_for_adjacent_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF q/k rows (per head: first half, second half) -> interleaved pairs, as llama.cpp stores.

    weight: [n_heads*head_dim, hidden] (or a bias [n_heads*head_dim]). Within each head, row
    r of the first half and row r of the second half become rows 2r and 2r+1.
    """
    head_dim = weight.shape[0] // n_heads
    per_head = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape).copy()


_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def tiny_gguf_weights(
    arch: str = "llama", seed: int = 0, tied: bool = True, cfg: TinyConfig = TINY
) -> dict[str, np.ndarray]:
    """The same weights under GGUF names; for `llama`, q/k permuted like llama.cpp's converter
    (qwen2 GGUFs keep HF order: llama.cpp runs qwen2 with NeoX, i.e. half-split, RoPE)."""
    out: dict[str, np.ndarray] = {}
    for name, arr in tiny_hf_weights(arch, seed, tied, cfg).items():
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = arr
        elif name == "model.norm.weight":
            out["output_norm.weight"] = arr
        elif name == "lm_head.weight":
            out["output.weight"] = arr
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"
            if arch == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                heads = cfg.n_heads if "q_proj" in rest else cfg.n_kv_heads
                arr = permute_for_adjacent_rope(arr, heads)
            out[gname] = arr
    return out


def write_tiny_gguf(
    directory: Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    tied: bool = True,
    weight_type: str = "F32",
    pre: str = "smollm",
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    cfg: TinyConfig = TINY,
    name: str | None = None,
    skip_tensors: tuple[str, ...] = (),
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
    tokenizer_model: str | None = "gpt2",
) -> Path:
    """Write the tiny model as a GGUF file; returns its path.

    weight_type: a `gguf.GGMLQuantizationType` name for the 2-D tensors ("F32", "F16", "Q8_0",
    "Q4_1", ...); 1-D tensors (norms, biases) stay F32 as llama.cpp's converter keeps them.
    For broken-file tests: `skip_tensors` leaves tensors out, `transform(name, array)` replaces
    an array before writing (e.g. a wrong shape), `tokenizer_model=None` writes no tokenizer.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"tiny-{arch}-s{seed}-{'tied' if tied else 'untied'}-{weight_type}.gguf")
    qtype = gguf.GGMLQuantizationType[weight_type]
    tokens, merges = tiny_vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.context)
    writer.add_embedding_length(cfg.hidden)
    writer.add_feed_forward_length(cfg.ffn)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(int(qtype) if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else 7)
    if tokenizer_model is not None:
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)
        writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for tname, arr in tiny_gguf_weights(arch, seed, tied, cfg).items():
        if tname in skip_tensors:
            continue
        if transform is not None:
            arr = transform(tname, arr)
        if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tname, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_HF_ARCH = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "mistral": ("MistralForCausalLM", "mistral"),
}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Write a .safetensors file by its published layout (u64 header size, JSON header, data).

    dtype: "F32", "F16" or "BF16" (BF16 = the top 16 bits of float32, round to nearest even).
    """
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if dtype == "F32":
            raw = arr.tobytes()
        elif dtype == "F16":
            raw = arr.astype(np.float16).tobytes()
        elif dtype == "BF16":
            bits = arr.view(np.uint32).astype(np.uint64)
            raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def write_tiny_hf(
    directory: Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    tied: bool = True,
    dtype: str = "F32",
    shards: int = 1,
    cfg: TinyConfig = TINY,
    with_tokenizer: bool = True,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
) -> Path:
    """Write the tiny model as a Hugging Face directory (config.json, safetensors, tokenizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch_name, model_type = _HF_ARCH[arch]
    config = {
        "architectures": [arch_name],
        "model_type": model_type,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "max_position_embeddings": cfg.context,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "vocab_size": tiny_vocab_size(),
        "tie_word_embeddings": tied,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    weights = tiny_hf_weights(arch, seed, tied, cfg)
    names = list(weights)
    if shards == 1:
        write_safetensors(directory / "model.safetensors", weights, dtype)
    else:
        weight_map = {}
        for k in range(shards):
            shard_name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in names[k::shards]}
            write_safetensors(directory / shard_name, part, dtype)
            weight_map.update({n: shard_name for n in part})
        index = {"metadata": {"total_size": 4 * sum(a.size for a in weights.values())}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if with_tokenizer:
        (directory / "tokenizer.json").write_text(_tiny_tokenizer_json())
        tok_config = {
            "bos_token": SPECIAL_TOKENS[BOS_ID],
            "eos_token": SPECIAL_TOKENS[EOS_ID],
            "add_bos_token": False,
            "model_max_length": cfg.context,
        }
        if chat_template is not None:
            tok_config["chat_template"] = chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return directory


def tiny_npu_sets(model: Path, *extra: str) -> list[str]:
    """`--set` arguments for a fast ort-cpu NPU path over a tiny model (chunk 8, one calibration sample)."""
    base = [
        f"model.source={model}",
        "prefill.chunk_size=8",
        "prefill.max_context=128",
        "calibration.samples=1",
        "calibration.tokens_per_sample=16",
        "outliers.scale_percentile=99.0",
        "device.npu_backend=ort-cpu",
        *extra,
    ]
    return [a for s in base for a in ("--set", s)]
