"""Tokenizers from GGUF metadata and tokenizer.json: reference ids, round trips, variants, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm

from mllm_deploy.errors import UserError
from mllm_deploy.model import load_tokenizer, read_spec
from mllm_deploy.model.tokenizer import tokenizer_from_gguf_metadata

GOLDEN = Path(__file__).parent / "golden" / "tokenizer_smollm2.json"


pytestmark = pytest.mark.usefixtures("module_private_cache")  # sha256 cache out of the user's dir


@pytest.fixture(scope="module")
def smollm():
    return load_tokenizer(read_spec("builtin:smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


def _cases():
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: repr(c["text"][:24]))
def test_default_model_matches_reference_ids(smollm, case):
    """Reference: transformers' own GGUF tokenizer conversion (scripts/make_tokenizer_reference.py)."""
    assert smollm.encode(case["text"]) == case["ids"]
    assert smollm.decode(case["ids"]) == case["text"]


def test_golden_covers_the_varied_text_the_issue_names():
    texts = "".join(c["text"] for c in _cases())
    for needle in ("def ", "345", "café", "你好", "🙂", "<|im_start|>", "   ", "\n\n"):
        assert needle in texts


def test_default_model_special_tokens_and_ids(smollm):
    assert (smollm.bos_id, smollm.eos_ids, smollm.vocab_size) == (1, (2, 0), 49152)  # <|im_end|>, then <|endoftext|>
    assert smollm.token_to_id("<|im_start|>") == 1 and smollm.token_to_id("<|im_end|>") == 2
    assert smollm.special_ids == frozenset(range(17))
    assert smollm.encode("<|im_end|>") == [2]
    as_text = smollm.encode("<|im_end|>", allow_special=False)
    assert as_text == [44, 108, 306, 79, 486, 108, 46] and smollm.decode(as_text) == "<|im_end|>"
    assert [smollm.id_to_token(i) for i in as_text] == ["<", "|", "im", "_", "end", "|", ">"]
    assert smollm.encode("Hi") == [26843] and smollm.encode("Hi", add_bos=True) == [1, 26843]
    assert smollm.encode("<|im_start|>Hi", add_bos=True) == [1, 26843]  # BOS is not doubled
    assert smollm.decode([1, 26843, 2], skip_special=True) == "Hi"


def _byte_vocab_metadata(pre: str, extra_tokens: list[str], merges: list[str]) -> dict:
    """GGUF tokenizer metadata for a byte-level vocab: 256 byte symbols + `extra_tokens`."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|end|>", *alphabet, *extra_tokens]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": np.array([3] + [1] * (len(tokens) - 1), np.int32),
    }


def _pieces(meta: dict, text: str) -> list[str]:
    tok = tokenizer_from_gguf_metadata(meta, "test.gguf")
    return tok.encode(text, add_special_tokens=False).tokens


def test_pre_tokenizer_variants_split_digits_their_own_way():
    digits = ["12", "123", "1234"]
    merges = ["1 2", "12 3", "123 4"]
    assert _pieces(_byte_vocab_metadata("gpt2", digits, merges), "1234") == ["1234"]  # GPT-2 keeps digit runs
    assert _pieces(_byte_vocab_metadata("smollm", digits, merges), "1234") == ["1", "2", "3", "4"]  # one digit each
    assert _pieces(_byte_vocab_metadata("llama-bpe", digits, merges), "1234") == ["123", "4"]  # groups of 3
    assert _pieces(_byte_vocab_metadata("qwen2", digits, merges), "1234") == ["1", "2", "3", "4"]


def test_llama3_and_qwen2_regex_keep_newlines_apart():
    meta = _byte_vocab_metadata("llama-bpe", [], [])
    assert _pieces(meta, "a!!\n\nb") == ["a", "!", "!", "Ċ", "Ċ", "b"]
    assert _pieces(meta, "<|end|>x") == ["<|end|>", "x"]


def test_unsupported_pre_tokenizer_is_refused():
    with pytest.raises(UserError) as info:
        tokenizer_from_gguf_metadata(_byte_vocab_metadata("deepseek-coder", [], []), "m.gguf")
    d = info.value.diagnostics[0]
    assert (d.message, d.file, d.key) == ("unsupported pre-tokenizer 'deepseek-coder'", "m.gguf", "tokenizer.ggml.pre")
    assert d.allowed == "gpt2, smollm, starcoder, refact, llama-bpe, qwen2"


def test_missing_pre_tokenizer_is_refused():
    meta = _byte_vocab_metadata("gpt2", [], [])
    del meta["tokenizer.ggml.pre"]
    with pytest.raises(UserError) as info:
        tokenizer_from_gguf_metadata(meta, "old.gguf")
    assert info.value.diagnostics[0].message.startswith("the GGUF file does not say which pre-tokenizer")


def test_tiny_gguf_and_hf_tokenizers_agree_with_the_trained_one(tiny_dir):
    reference = tm.tiny_tokenizer()
    gguf_tok = load_tokenizer(read_spec(str(tm.write_tiny_gguf(tiny_dir))))
    hf_tok = load_tokenizer(read_spec(str(tm.write_tiny_hf(tiny_dir / "hf"))))
    assert gguf_tok.vocab_size == hf_tok.vocab_size == 384
    for text in ["What is the capital of France? 2024", "<|im_start|>user\ncafé 😀<|im_end|>\n", "  x\t\ty  "]:
        ids = reference.encode(text).ids
        assert gguf_tok.encode(text) == hf_tok.encode(text) == ids
        assert gguf_tok.decode(ids) == hf_tok.decode(ids) == text
    assert gguf_tok.encode("What")[:1] == [reference.token_to_id("Wh")]


def test_stream_never_emits_half_a_character(smollm):
    text = "Emoji 🙂👍🏽👨‍👩‍👧 and CJK 你好世界, accents é, flags 🇫🇷. <|im_end|>"
    ids = smollm.encode(text)
    assert len(ids) > len(text.encode()) // 4  # many characters span several byte tokens
    stream = smollm.stream()
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == smollm.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert " 🙂" in pieces and "你" in pieces and "👍" in pieces  # each released whole, after its bytes
    assert sum(p == "" for p in pieces) >= 6  # bytes of a character are held back


def test_stream_of_arbitrary_ids_adds_up_to_decode(smollm):
    ids = np.random.default_rng(3).integers(0, 49152, size=300).tolist()
    stream = smollm.stream()
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == smollm.decode(ids)


def test_stream_releases_invalid_bytes_at_finish(smollm):
    lone = smollm.encode("🙂")[:1]  # the first byte-token of a 4-byte character
    stream = smollm.stream()
    assert stream.push(lone[0]) == ""
    assert stream.finish() == "\ufffd" == smollm.decode(lone)


def test_stream_skip_special(tiny_dir):
    tok = load_tokenizer(read_spec(str(tm.write_tiny_gguf(tiny_dir))))
    ids = tok.encode("<|im_start|>Paris<|im_end|>")
    stream = tok.stream(skip_special=True)
    assert "".join([stream.push(i) for i in ids] + [stream.finish()]) == "Paris"
