"""Model sources: specs and float32 weights from real GGUF files and HF directories."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import tiny_models as tm

from mllm_deploy.model import load_weights, read_spec
from mllm_deploy.model.gguf_source import gguf_tensor

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _rope(x: np.ndarray, style: str, theta: float = tm.TINY.rope_theta) -> np.ndarray:
    """x: [tokens, head_dim] rotated at positions 0..tokens-1 in the given RoPE convention."""
    n, d = x.shape
    freqs = theta ** (-np.arange(0, d, 2) / d)  # [d/2]
    angle = np.arange(n)[:, None] * freqs[None, :]  # [n, d/2]
    cos, sin = np.cos(angle), np.sin(angle)
    if style == "adjacent":
        a, b = x[:, 0::2], x[:, 1::2]
        out = np.empty_like(x)
        out[:, 0::2], out[:, 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    a, b = x[:, : d // 2], x[:, d // 2 :]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=1)


def test_tiny_gguf_spec_has_the_metadata_values(tiny_dir):
    spec = read_spec(str(tm.write_tiny_gguf(tiny_dir)))
    assert (spec.format, spec.architecture, spec.rope_style) == ("gguf", "llama", "adjacent")
    assert (spec.n_layers, spec.hidden, spec.ffn, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (
        2,
        64,
        128,
        4,
        2,
        16,
    )
    assert (spec.vocab, spec.context, spec.rope_theta, spec.rms_eps) == (384, 256, 10000.0, pytest.approx(1e-5))
    assert spec.tied_embeddings and not spec.qkv_bias
    assert (spec.bos_id, spec.eos_ids, spec.add_bos) == (1, (2,), False)
    assert spec.chat_template == tm.TINY_CHAT_TEMPLATE
    per_layer = 64 + 64 * 64 + 2 * 32 * 64 + 64 * 64 + 64 + 3 * 128 * 64
    assert spec.weight_bytes_f32 == 4 * (384 * 64 + 2 * per_layer + 64)
    assert spec.extra["tensor_types"] == {"F32": 2 * 9 + 2}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_hf_spec_matches_the_gguf_spec(tiny_dir, arch):
    hf = read_spec(str(tm.write_tiny_hf(tiny_dir / f"hf-{arch}", arch=arch, tied=False)))
    assert (hf.format, hf.architecture, hf.rope_style) == ("hf", arch, "half")
    assert hf.qkv_bias == (arch == "qwen2") and not hf.tied_embeddings
    gg = read_spec(str(tm.write_tiny_gguf(tiny_dir, tied=False)))
    same = [
        "n_layers",
        "hidden",
        "ffn",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "vocab",
        "context",
        "rope_theta",
        "bos_id",
        "eos_ids",
    ]
    assert [getattr(hf, k) for k in same] == [getattr(gg, k) for k in same]
    assert hf.chat_template == tm.TINY_CHAT_TEMPLATE


def test_gguf_f32_weights_are_the_permuted_hf_weights(tiny_dir):
    ref = tm.tiny_hf_weights(tied=False)
    w = load_weights(read_spec(str(tm.write_tiny_gguf(tiny_dir, tied=False))))
    assert (
        w.layers[1].wq.shape == (64, 64) and w.layers[1].wk.shape == (32, 64) and w.layers[1].w_down.shape == (64, 128)
    )
    np.testing.assert_array_equal(
        w.layers[1].wq, tm.permute_for_adjacent_rope(ref["model.layers.1.self_attn.q_proj.weight"], 4)
    )
    np.testing.assert_array_equal(
        w.layers[0].wk, tm.permute_for_adjacent_rope(ref["model.layers.0.self_attn.k_proj.weight"], 2)
    )
    np.testing.assert_array_equal(w.layers[0].wv, ref["model.layers.0.self_attn.v_proj.weight"])
    np.testing.assert_array_equal(w.layers[1].w_gate, ref["model.layers.1.mlp.gate_proj.weight"])
    np.testing.assert_array_equal(w.output, ref["lm_head.weight"])
    np.testing.assert_array_equal(w.output_norm, ref["model.norm.weight"])
    assert w.output is not w.tok_embd and w.layers[0].bq is None


@pytest.mark.parametrize("dtype,shards", [("F32", 1), ("F16", 1), ("BF16", 2)])
def test_hf_weights_in_each_dtype_and_sharded(tiny_dir, dtype, shards):
    ref = tm.tiny_hf_weights(arch="qwen2", tied=True)
    spec = read_spec(str(tm.write_tiny_hf(tiny_dir / f"q-{dtype}", arch="qwen2", dtype=dtype, shards=shards)))
    w = load_weights(spec)
    name = "model.layers.1.self_attn.k_proj.weight"
    if dtype == "F32":
        expected = ref[name]
    elif dtype == "F16":
        expected = ref[name].astype(np.float16).astype(np.float32)
    else:  # round to nearest even at 16 bits, like torch's bfloat16
        bits = ref[name].view(np.uint32).astype(np.uint64)
        expected = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    assert w.layers[1].wk.dtype == np.float32
    np.testing.assert_array_equal(w.layers[1].wk, expected)
    assert w.layers[1].bk.shape == (32,) and w.layers[0].bq.shape == (64,)
    assert w.output is w.tok_embd  # tied


@pytest.mark.parametrize("weight_type", ["Q8_0", "Q4_1", "F16"])
def test_quantized_gguf_dequantizes_like_gguf(tiny_dir, weight_type):
    ref = tm.tiny_gguf_weights()
    w = load_weights(read_spec(str(tm.write_tiny_gguf(tiny_dir, weight_type=weight_type))))
    qtype = gguf.GGMLQuantizationType[weight_type]
    expected = gguf.quants.dequantize(gguf.quants.quantize(ref["blk.1.ffn_up.weight"], qtype), qtype)
    np.testing.assert_array_equal(w.layers[1].w_up, expected)
    err = np.abs(w.layers[1].w_up - ref["blk.1.ffn_up.weight"]).max()
    assert 0 < err < {"Q8_0": 0.02, "Q4_1": 0.2, "F16": 1e-3}[weight_type]
    np.testing.assert_array_equal(w.layers[1].ffn_norm, ref["blk.1.ffn_norm.weight"])  # 1-D stays F32


def test_gguf_and_hf_give_the_same_attention_scores(tiny_dir):
    """Permuted Q/K with adjacent RoPE == HF Q/K with half RoPE: the pairing is consistent."""
    x = np.random.default_rng(5).standard_normal((7, 64)).astype(np.float64)  # [tokens, hidden]
    gw = load_weights(read_spec(str(tm.write_tiny_gguf(tiny_dir))))
    hw = load_weights(read_spec(str(tm.write_tiny_hf(tiny_dir / "hf-scores"))))
    for layer_g, layer_h in zip(gw.layers, hw.layers, strict=True):
        for head in range(4):
            rows = slice(16 * head, 16 * head + 16)
            kv_rows = slice(16 * (head // 2), 16 * (head // 2) + 16)  # GQA: 2 query heads per KV head
            qg, kg = _rope(x @ layer_g.wq[rows].T, "adjacent"), _rope(x @ layer_g.wk[kv_rows].T, "adjacent")
            qh, kh = _rope(x @ layer_h.wq[rows].T, "half"), _rope(x @ layer_h.wk[kv_rows].T, "half")
            np.testing.assert_allclose(qg @ kg.T, qh @ kh.T, rtol=1e-9, atol=1e-9)
        assert not np.allclose(layer_g.wq, layer_h.wq)  # they really are stored differently


def test_qwen2_gguf_is_unpermuted_with_half_rope(tiny_dir):
    spec = read_spec(str(tm.write_tiny_gguf(tiny_dir, arch="qwen2", tied=False)))
    assert (spec.architecture, spec.rope_style, spec.qkv_bias) == ("qwen2", "half", True)
    ref = tm.tiny_hf_weights(arch="qwen2", tied=False)
    w = load_weights(spec)
    np.testing.assert_array_equal(w.layers[0].wq, ref["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(w.layers[1].bv, ref["model.layers.1.self_attn.v_proj.bias"])


def test_relative_paths_resolve_against_base_dir(tiny_dir):
    path = tm.write_tiny_gguf(tiny_dir)
    spec = read_spec(path.name, base_dir=tiny_dir)
    assert spec.path == str(path) and spec.source == path.name


def test_weight_cache_is_reused_and_rebuilt_when_damaged(tiny_dir, tmp_path):
    from mllm_deploy.model import weight_cache
    from mllm_deploy.model.gguf_source import gguf_weights_cache_key

    spec = read_spec(str(tm.write_tiny_gguf(tiny_dir, weight_type="Q8_0", name="cached.gguf")))
    first = load_weights(spec)
    w_down, tok_embd = np.array(first.layers[1].w_down), np.array(first.tok_embd)  # copies: we damage the files
    entry = weight_cache.weights_cache_root() / gguf_weights_cache_key(spec)
    assert (entry / "manifest.json").exists() and len(list(entry.glob("*.npy"))) == 1 + 2 * 9 + 1
    second = load_weights(spec)
    assert isinstance(second.layers[0].wq, np.memmap)
    np.testing.assert_array_equal(second.layers[1].w_down, w_down)

    npy = entry / "blk.1.ffn_down.weight.npy"
    npy.write_bytes(npy.read_bytes()[:-100])  # a damaged entry (truncated array)
    third = load_weights(spec)
    np.testing.assert_array_equal(third.layers[1].w_down, w_down)
    assert npy.stat().st_size > 64 * 128 * 4
    (entry / "manifest.json").unlink()  # an entry without its manifest is incomplete
    np.testing.assert_array_equal(load_weights(spec).tok_embd, tok_embd)
    assert not list(weight_cache.weights_cache_root().glob(".*"))  # no temp dirs left behind


def test_cache_key_follows_the_files_content(tiny_dir, private_cache):
    import os
    import shutil

    from mllm_deploy.model.gguf_source import gguf_weights_cache_key

    path = tm.write_tiny_gguf(tiny_dir, name="keyed.gguf")
    spec = read_spec(str(path))
    before = gguf_weights_cache_key(spec)
    os.utime(path, ns=(1, 1))
    assert gguf_weights_cache_key(spec) == before  # touched, same bytes: the same entry
    copy = shutil.copy(path, tiny_dir / "copy-of-keyed.gguf")  # a copy elsewhere (a bundle's build): too
    assert gguf_weights_cache_key(read_spec(str(copy))) == before
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    path.write_bytes(bytes(data))
    assert gguf_weights_cache_key(spec) != before
    assert gguf_weights_cache_key(dataclasses.replace(spec, file_sha256="ab" * 32)) != before


def test_default_model_spec_matches_the_design_facts():
    spec = read_spec("builtin:smollm2-135m-instruct")
    assert (spec.architecture, spec.rope_style, spec.n_layers, spec.hidden, spec.ffn) == (
        "llama",
        "adjacent",
        30,
        576,
        1536,
    )
    assert (spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.vocab, spec.context) == (9, 3, 64, 49152, 8192)
    assert spec.rope_theta == 100000.0 and spec.rms_eps == pytest.approx(1e-5)
    assert spec.tied_embeddings and not spec.add_bos and spec.eos_ids == (2,) and spec.bos_id == 1
    assert spec.extra["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert spec.file_sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert spec.chat_template.startswith("{% for message in messages %}")


def test_default_model_tensor_values():
    """Values read independently with gguf.GGUFReader when this test was written."""
    spec = read_spec("builtin:smollm2-135m-instruct")
    wq = gguf_tensor(spec, "blk.0.attn_q.weight")
    assert wq.shape == (576, 576) and wq.dtype == np.float32
    np.testing.assert_array_equal(wq[0, :4], np.float32([-0.09631348, 0.15734863, -0.09631348, -0.73046875]))
    np.testing.assert_array_equal(wq[1, :4], np.float32([-0.11730957, -0.11730957, -0.19281006, 0.26019287]))
