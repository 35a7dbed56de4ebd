"""The real default model (SmolLM2-135M) through the DAG: both policies give identical logits,
and the INT8 prefill agrees with the float engine on the next token."""

from __future__ import annotations

import numpy as np
import pytest
from npu_doubles import OrtInt8Kernels
from plan_fixtures import pinned_host

from mllm_deploy.bench.prompt_text import prompt_ids
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.model import load_tokenizer, load_weights
from mllm_deploy.plan import build_plan
from mllm_deploy.profile import load_profile
from mllm_deploy.resolve import resolve
from mllm_deploy.runtime.dag_prefill import DagPrefill

CHUNK = 32


@pytest.fixture(scope="module")
def real():
    loaded = load_profile(
        None, ["device.npu_backend=ort-cpu", f"prefill.chunk_size={CHUNK}", "outliers.prune_fraction=1.0"]
    )
    from mllm_deploy.model import read_spec

    spec = read_spec(loaded.profile.model.source)
    resolved = resolve(loaded, pinned_host(), spec)
    weights = load_weights(spec)
    ids = prompt_ids(load_tokenizer(spec), 3 * CHUNK - 9)  # 3 chunks, the last one padded
    kernels = OrtInt8Kernels(weights, CHUNK, ids, npu_threads=1)
    return resolved, weights, ids, kernels


def test_real_model_policies_agree_and_match_float(real):
    resolved, weights, ids, kernels = real
    engine = FloatEngine(weights)
    logits = {}
    for policy in ("sequential", "out-of-order"):
        prefill = DagPrefill(
            weights,
            engine.rope,
            kernels,
            lambda n: build_plan(resolved, prompt_tokens=n),
            chunk_tokens=CHUNK,
            policy=policy,
            cpu_threads=1,
        )
        try:
            cache = engine.new_cache(256)
            logits[policy] = list(prefill.run(cache, ids))[-1][1][0]
            assert cache.token_ids == ids
        finally:
            prefill.close()
    np.testing.assert_array_equal(logits["sequential"], logits["out-of-order"])
    ref = engine.prefill(engine.new_cache(256), ids, chunk_size=CHUNK, pad_last_chunk=True).logits[0]
    got = logits["out-of-order"]
    assert int(np.argmax(got)) == int(np.argmax(ref))
    # max-abs scales, no outlier correction (the down inputs suffer, DESIGN.md §4): a loose bound
    assert float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref)) > 0.95
