"""Gemma 3's SentencePiece vocabulary from its GGUF, built into a `tokenizers` BPE, against ids
from an independent implementation (transformers 5.25, scripts/make_tokenizer_reference.py
... sentencepiece): unicode, digits, whitespace runs, byte fallback, special and user-defined
pieces. Building the tokenizer takes ~10-20 s (513k merges derived from 262k pieces)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllm_deploy.model import load_tokenizer, read_spec

REFERENCE = Path(__file__).parent / "golden" / "tokenizer_gemma3.json"


@pytest.fixture(scope="module")
def gemma_tokenizer():
    return load_tokenizer(read_spec("builtin:gemma3-270m"))


def test_ids_equal_the_reference_on_every_case(gemma_tokenizer):
    doc = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert doc["model_file"] == "gemma-3-270m-q4_k_m.gguf" and len(doc["cases"]) == 27
    for case in doc["cases"]:
        assert gemma_tokenizer.encode(case["text"], add_bos=False) == case["ids"], case["text"]


def test_byte_fallback_specials_bos_and_round_trip(gemma_tokenizer):
    tok = gemma_tokenizer
    assert tok.encode("\u0378", add_bos=False) == [tok.token_to_id("<0xCD>"), tok.token_to_id("<0xB8>")]
    assert tok.encode("hi") == [2, *tok.encode("hi", add_bos=False)]  # the GGUF says add BOS (<bos> = 2)
    assert tok.encode("<end_of_turn>", add_bos=False) == [106]
    assert tok.encode("<end_of_turn>", allow_special=False, add_bos=False) != [106]
    assert 106 in tok.eos_ids and 1 in tok.eos_ids  # <end_of_turn> ends generation as <eos> does
    text = "Whitespace   runs\t\ttabs \n\n\n ünïcödé 🙂 \u0378 12345"
    assert tok.decode(tok.encode(text, add_bos=False)) == text
