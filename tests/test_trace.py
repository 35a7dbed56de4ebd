"""Chrome trace JSON from a real DAG prefill + decode (tiny model, ort INT8 kernel double), and
DagEngine driving generate() like the float engine."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from npu_doubles import FloatKernels, OrtInt8Kernels
from plan_fixtures import pinned_host

from mllm_deploy.events import SubgraphFinished, SubgraphStarted, TokenEmitted
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.model import load_weights, read_spec
from mllm_deploy.plan import build_plan
from mllm_deploy.profile import load_profile
from mllm_deploy.resolve import resolve
from mllm_deploy.runtime.dag_engine import DagEngine
from mllm_deploy.runtime.dag_prefill import DagPrefill
from mllm_deploy.runtime.engine import with_subgraph_events
from mllm_deploy.runtime.generate import GenerationRequest, generate
from mllm_deploy.runtime.trace import TraceRecorder

CHUNK = 8


class _Detok:
    def push(self, token_id):
        return f"<{token_id}>"

    def finish(self):
        return ""


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    spec = read_spec(str(tiny_gguf))
    return tiny_gguf, spec, load_weights(spec, use_cache=False)


def engine_for(tiny, kernels, cpu_threads=1):
    path, spec, weights = tiny
    loaded = load_profile(
        None,
        [
            f"model.source={path}",
            "device.npu_backend=ort-cpu",
            f"prefill.chunk_size={CHUNK}",
            "prefill.max_context=256",
            "outliers.prune_fraction=1.0",
        ],
    )
    resolved = resolve(loaded, pinned_host(), spec)
    float_engine = FloatEngine(weights)
    prefill = DagPrefill(
        weights,
        float_engine.rope,
        kernels,
        lambda n: build_plan(resolved, prompt_tokens=n),
        chunk_tokens=CHUNK,
        policy="out-of-order",
        cpu_threads=cpu_threads,
    )
    return DagEngine(float_engine, prefill, None, npu_label=kernels.backend_label), float_engine


PROMPT = [int(i) for i in np.random.default_rng(1).integers(3, 300, 21)]


def run_turn(engine, cache, max_new=5):
    request = GenerationRequest(max_new_tokens=max_new, chunk_size=CHUNK)
    return list(with_subgraph_events(generate(engine, cache, PROMPT, request, _Detok()), engine))


def test_dag_engine_generates_what_the_float_engine_generates(tiny):
    engine, float_engine = engine_for(tiny, FloatKernels(tiny[2], CHUNK))
    try:
        events = run_turn(engine, engine.new_cache(128))
        ref = list(
            generate(
                float_engine,
                float_engine.new_cache(128),
                PROMPT,
                GenerationRequest(max_new_tokens=5, chunk_size=CHUNK, pad_last_chunk=True),
                _Detok(),
            )
        )
        assert events[-1].token_ids == ref[-1].token_ids and len(events[-1].token_ids) == 5
        started = [e for e in events if isinstance(e, SubgraphStarted)]
        finished = [e for e in events if isinstance(e, SubgraphFinished)]
        assert len(started) == len(finished) == len(engine.prefill.graph(len(PROMPT)).tasks)
        first_token = next(i for i, e in enumerate(events) if isinstance(e, TokenEmitted))
        assert all(i < first_token for i, e in enumerate(events) if isinstance(e, SubgraphFinished))
    finally:
        engine.close()


def test_trace_json_has_an_npu_lane_and_a_cpu_lane(tiny, tmp_path):
    kernels = OrtInt8Kernels(tiny[2], CHUNK, PROMPT)
    engine, _ = engine_for(tiny, kernels, cpu_threads=2)
    recorder = TraceRecorder(npu_label=kernels.backend_label)
    try:
        for event in run_turn(engine, engine.new_cache(128)):
            recorder.observe(event)
    finally:
        engine.close()
    path = recorder.write(tmp_path / "t.json")
    trace = json.loads(path.read_text())
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[1] == "NPU (ort-cpu INT8 (test double))" and names[2] == "CPU"
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    npu = sorted((e["ts"], e["ts"] + e["dur"]) for e in slices if e["tid"] == 1)
    assert len(npu) == 3 * 2 * 4  # chunks x layers x linears
    assert all(a[1] <= b[0] + 1e-3 for a, b in itertools.pairwise(npu))
    assert {e["args"]["kind"] for e in slices if e["tid"] == 1} == {"qkv", "o_proj", "gate_up", "down"}
    cpu = [e for e in slices if e["tid"] >= 2]
    assert {"attention", "attn_norm", "embed", "lm_head"} <= {e["args"].get("kind") for e in cpu}
    assert sum(e["name"].startswith("decode ") for e in cpu) == 4  # tokens 2..5
    for tid in {e["tid"] for e in cpu}:  # no lane holds overlapping slices
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in cpu if e["tid"] == tid)
        assert all(a[1] <= b[0] + 1e-3 for a, b in itertools.pairwise(spans))
    assert min(e["ts"] for e in slices) == 0.0
    instants = [e["name"] for e in trace["traceEvents"] if e["ph"] == "i"]
    assert instants.count("first token") == 1 and "chunk 3/3 committed" in instants
