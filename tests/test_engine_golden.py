"""The float engine against golden logits from an independent implementation.

tests/golden/*.npz are written by scripts/make_reference_logits.py: Hugging Face
transformers (torch, float32) loading the same files, tokenizing with its own tokenizer.
Per prompt: `ids` (int32), `last_logits` (last position, float16 for the real model, float32
for tiny ones), `argmax` (int32, every position) and `margin` (top-1 minus top-2 logit).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tiny_models

from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.model import load_weights, read_spec

GOLDEN = Path(__file__).parent / "golden"
REAL = np.load(GOLDEN / "smollm2_reference.npz")
TINY = np.load(GOLDEN / "tiny_reference.npz")
REAL_META = json.loads(str(REAL["meta"]))
TINY_META = json.loads(str(TINY["meta"]))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def real_engine() -> FloatEngine:
    spec = read_spec("builtin:smollm2-135m-instruct")
    return FloatEngine(load_weights(spec))


def test_golden_file_is_for_the_installed_model():
    spec = read_spec("builtin:smollm2-135m-instruct")
    assert Path(spec.path).name == REAL_META["gguf_file"]
    assert spec.file_sha256 in (None, REAL_META["gguf_sha256"])
    assert len(REAL_META["prompts"]) >= 5
    lengths = [len(REAL[f"{p}/ids"]) for p in REAL_META["prompts"]]
    assert max(lengths) > 250 and min(lengths) < 20


@pytest.mark.parametrize("prompt", REAL_META["prompts"])
def test_real_model_matches_reference(real_engine, prompt):
    ids = REAL[f"{prompt}/ids"].tolist()
    out = real_engine.prefill(real_engine.new_cache(len(ids)), ids, chunk_size=256, logit_rows="all")
    assert out.logits.shape == (len(ids), real_engine.spec.vocab)
    assert cosine(out.logits[-1], REAL[f"{prompt}/last_logits"]) >= 0.9999
    mismatched = np.nonzero(out.logits.argmax(-1) != REAL[f"{prompt}/argmax"])[0]
    assert mismatched.tolist() == [], (
        f"argmax differs at {mismatched} (reference margins {REAL[f'{prompt}/margin'][mismatched]})"
    )


@pytest.fixture(scope="module")
def real_unchunked(real_engine):
    """raw_long in one chunk: (last logits [1, vocab], its KV cache)."""
    ids = REAL["raw_long/ids"].tolist()
    cache = real_engine.new_cache(len(ids))
    return real_engine.prefill(cache, ids, chunk_size=len(ids)).logits, cache


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 256])
def test_real_model_chunked_prefill_equals_unchunked(real_engine, real_unchunked, chunk_size):
    """Same last-token logits and the same K/V at every layer and position (which fixes every
    later logit), with the last chunk padded as the NPU graphs will pad it."""
    whole_logits, whole_cache = real_unchunked
    ids = REAL["raw_long/ids"].tolist()
    # Small chunks run at decode speed (every chunk reads all weights): keep those prompts short.
    n = {1: 32, 7: 100}.get(chunk_size, len(ids))
    cache = real_engine.new_cache(len(ids))
    logits = real_engine.prefill(cache, ids[:n], chunk_size=chunk_size, pad_last_chunk=True).logits
    assert cache.length == n
    for got, want in ((cache.k[:, :, :n], whole_cache.k[:, :, :n]), (cache.v[:, :, :n], whole_cache.v[:, :, :n])):
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    if n == len(ids):
        assert np.abs(logits - whole_logits).max() / np.abs(whole_logits).max() < 1e-4


def tiny_weights_sha256(arch: str, tied: bool, seed: int) -> str:
    digest = hashlib.sha256()
    for name, arr in tiny_models.tiny_hf_weights(arch, seed, tied).items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arr, np.float32).tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("variant", sorted(TINY_META["variants"]))
def test_tiny_models_match_reference(tmp_path, variant):
    info = TINY_META["variants"][variant]
    seed = TINY_META["seed"]
    assert tiny_weights_sha256(info["arch"], info["tied"], seed) == info["weights_sha256"], (
        "tests/tiny_models.py now builds different weights: regenerate tests/golden with "
        "scripts/make_reference_logits.py --only tiny"
    )
    if info["format"] == "gguf":
        path = tiny_models.write_tiny_gguf(tmp_path, arch=info["arch"], seed=seed, tied=info["tied"])
    else:
        path = tiny_models.write_tiny_hf(tmp_path / variant, arch=info["arch"], seed=seed, tied=info["tied"])
    spec = read_spec(str(path))
    assert spec.rope_style == ("adjacent" if info["format"] == "gguf" and info["arch"] == "llama" else "half")
    engine = FloatEngine(load_weights(spec, use_cache=False))
    for prompt in TINY_META["prompts"]:
        key = f"{variant}/{prompt}"
        ids = TINY[f"{key}/ids"].tolist()
        out = engine.prefill(engine.new_cache(len(ids)), ids, chunk_size=64, logit_rows="all").logits
        assert cosine(out[-1], TINY[f"{key}/last_logits"]) >= 0.9999
        assert (out.argmax(-1) == TINY[f"{key}/argmax"]).all()
        np.testing.assert_allclose(out[-1], TINY[f"{key}/last_logits"], rtol=1e-3, atol=1e-3)
