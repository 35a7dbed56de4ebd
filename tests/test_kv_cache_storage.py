"""`decode.kv_cache` on the NPU path (tiny model, ort-cpu): int8 by default with the calibrated
steps, float32 on request; both decode the same prompt to nearly the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models

from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.interface.session import load_model
from mllm_deploy.profile import load_profile

CFG = tiny_models.SMALLEST


@pytest.fixture(scope="module")
def engines(smallest_gguf, tmp_path_factory):
    path = smallest_gguf
    mp = pytest.MonkeyPatch()
    mp.setenv("MLLM_DEPLOY_CACHE", str(tmp_path_factory.mktemp("cache")))
    base = [
        f"model.source={path}",
        "device.npu_backend=ort-cpu",
        "prefill.chunk_size=8",
        "prefill.max_context=128",
        "calibration.samples=2",
        "calibration.tokens_per_sample=32",
    ]
    try:
        engines = {
            kv: load_model(Deployment.of(load_profile(None, [*base, f"decode.kv_cache={kv}"]))).engine
            for kv in ("int8", "float32")
        }
        engines["int8 attention"] = load_model(
            Deployment.of(load_profile(None, [*base, "prefill.attention=int8"]))
        ).engine
        yield engines
    finally:
        mp.undo()


def test_npu_path_keeps_an_int8_kv_cache_unless_asked_for_float32(engines):
    int8, float32 = engines["int8"], engines["float32"]
    assert int8.new_cache(32).k.dtype == np.int8 and int8.decode_name == "cpu-int8-ort-gqa b64 kv-int8"
    assert float32.new_cache(32).k.dtype == np.float32 and float32.decode_name.endswith("kv-float32")
    steps = int8.kv_scales.k
    assert steps.shape == (CFG.n_layers, CFG.n_kv_heads, CFG.hidden // CFG.n_heads) and np.all(steps > 0)


def test_int8_kv_cache_decodes_close_to_float32(engines):
    prompt = [3 + (i * 7) % 250 for i in range(20)]
    logits = {}
    for kv in ("int8", "float32"):
        engine = engines[kv]
        cache = engine.new_cache(64)
        for _ in engine.prefill_chunks(cache, prompt, chunk_size=8):
            pass
        logits[kv] = [engine.decode_step(cache, t) for t in (5, 9, 11)]
    for a, b in zip(logits["int8"], logits["float32"], strict=True):
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
        assert not np.array_equal(a, b)  # really two storages


def test_prefill_attention_int8_is_what_the_engine_runs(engines):
    assert engines["int8"].attention_name == "float32" and engines["float32"].attention_name == "float32"
    int8 = engines["int8 attention"]
    assert int8.attention_name == "int8" and int8.prefill.chunk_attention is not None
    prompt = [3 + (i * 7) % 250 for i in range(20)]
    last = {}
    for name in ("int8", "int8 attention"):
        cache = engines[name].new_cache(64)
        last[name] = [lg for _, lg in engines[name].prefill_chunks(cache, prompt, chunk_size=8)][-1][0]
    a, b = last["int8"], last["int8 attention"]
    assert not np.array_equal(a, b) and float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
