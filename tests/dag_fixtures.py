"""DAG prefill on the three-layer tiny model (the `tiny_three_layers` fixture in tests/conftest.py):
its plans, a DagPrefill over given kernels, and the float engine's reference for a prompt."""

from __future__ import annotations

import numpy as np
from plan_fixtures import pinned_host

from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.plan import build_plan
from mllm_deploy.profile import load_profile
from mllm_deploy.resolve import resolve
from mllm_deploy.runtime.dag_prefill import DagPrefill

CHUNK = 8
IDS = [int(i) for i in np.random.default_rng(3).integers(3, 300, size=29)]  # 4 chunks, last has 5 real rows


def plan_factory(path, spec, *settings):
    loaded = load_profile(
        None,
        [
            f"model.source={path}",
            "device.npu_backend=ort-cpu",
            f"prefill.chunk_size={CHUNK}",
            "prefill.max_context=256",
            *settings,
        ],
    )
    resolved = resolve(loaded, pinned_host(), spec)
    return lambda n_tokens: build_plan(resolved, prompt_tokens=n_tokens)


def make_prefill(tiny, kernels, policy="out-of-order", cpu_threads=1, *settings):
    """`tiny` is (path, spec, weights); returns (DagPrefill, the float engine on the same weights)."""
    path, spec, weights = tiny
    engine = FloatEngine(weights)
    return DagPrefill(
        weights,
        engine.rope,
        kernels,
        plan_factory(path, spec, *settings),
        chunk_tokens=CHUNK,
        policy=policy,
        cpu_threads=cpu_threads,
    ), engine


def run_all(prefill, cache, ids, cancel=None):
    out = list(prefill.run(cache, ids, cancel=cancel))
    return out, out[-1][1] if out else None


def float_reference(engine, ids, chunk=CHUNK):
    cache = engine.new_cache(256)
    result = engine.prefill(cache, ids, chunk_size=chunk, pad_last_chunk=True)
    return result.logits, cache
