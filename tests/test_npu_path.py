"""The NPU path on a tiny model: artifacts (calibration, graphs, shadow rows) built into a private
cache, kernels on ort-cpu, sequential NPU prefill close to float, qnn-htp (x86 simulator) agreeing
with ort-cpu, and the NpuLayerKernels contract the scheduler uses."""

from __future__ import annotations

import numpy as np
import pytest
from plan_fixtures import pinned_host

from mllm_deploy.compile.build import compile_artifacts
from mllm_deploy.forward.float_engine import FloatEngine
from mllm_deploy.profile import load_profile
from mllm_deploy.resolve import resolve
from mllm_deploy.runtime.npu_kernels import NpuPrefillEngine, load_npu_kernels

CHUNK = 16
BASE = [
    f"prefill.chunk_size={CHUNK}",
    "prefill.max_context=256",
    "calibration.samples=2",
    "calibration.tokens_per_sample=48",
    "outliers.scale_percentile=99.0",
    "outliers.prune_fraction=0.34",
]
IDS = [int(i) for i in np.random.default_rng(3).integers(3, 300, size=37)]  # 3 chunks, last one padded


@pytest.fixture(scope="module")
def env(module_private_cache, tiny_three_layers):
    """(path, spec, weights) of the three-layer tiny model; artifacts go to the module's own cache."""
    return tiny_three_layers


def resolved_for(env, *settings, backend="ort-cpu"):
    path, spec, _ = env
    loaded = load_profile(None, [f"model.source={path}", f"device.npu_backend={backend}", *BASE, *settings])
    caps = pinned_host()
    if backend == "qnn-htp":  # qnn-htp compiles for a named HTP: the simulator here plays a v75
        caps = caps.model_copy(update={"npu": caps.npu.model_copy(update={"htp_arch": "v75"})})
    return resolve(loaded, caps, spec)


def prefill_logits(engine, ids=IDS):
    return engine.prefill(engine.new_cache(256), ids, chunk_size=CHUNK, logit_rows="all").logits


@pytest.fixture(scope="module")
def shadow_path(env):
    resolved = resolved_for(env)
    artifacts = compile_artifacts(resolved, log=lambda m: None, progress=lambda *a: None)
    return resolved, artifacts, load_npu_kernels(resolved, artifacts)


def test_kernels_contract_shapes_and_shadowed_gate_up(env, shadow_path):
    _, artifacts, kernels = shadow_path
    spec = env[1]
    assert kernels.chunk_tokens == CHUNK and kernels.backend_label.startswith("ort-cpu emulation")
    cal = artifacts.calibration
    by_damage = sorted(cal.inputs, key=lambda i: -i.pruning_damage)
    assert kernels.shadowed == cal.shadowed == {(i.layer, i.kind) for i in by_damage[:8]}  # 12 - round(0.34 * 12)
    assert set(kernels.latencies_ms()) == {(n, k) for n in range(3) for k in ("qkv", "o_proj", "gate_up", "down")}
    assert all(ms > 0 for ms in kernels.latencies_ms().values())
    x = np.random.default_rng(0).standard_normal((CHUNK, spec.hidden)).astype(np.float32) * 3
    shadowed_layer = next(layer for layer, kind in sorted(kernels.shadowed) if kind == "gate_up")
    # a pruned gate_up (all pruned here: on this tiny model every gate_up ranks in the top 8) computes silu·up itself
    pruned = resolved_for(env, "outliers.prune_fraction=1.0")
    plain = load_npu_kernels(pruned, compile_artifacts(pruned, log=lambda m: None, progress=lambda *a: None))
    assert not plain.shadowed
    assert [a.shape for a in plain.run_graph(0, "gate_up", x)] == [(CHUNK, spec.ffn)]
    assert plain.shadow(0, "gate_up", x) is None
    npu = kernels.run_graph(shadowed_layer, "gate_up", x)  # gate, up before silu
    fix = kernels.shadow(shadowed_layer, "gate_up", x)
    assert [a.shape for a in npu] == [a.shape for a in fix.dense(CHUNK)] == [(CHUNK, spec.ffn)] * 2
    (act,) = kernels.combine(shadowed_layer, "gate_up", npu, fix)
    w = env[2].layers[shadowed_layer]
    gate, up = x @ w.w_gate.T, x @ w.w_up.T
    want = gate / (1 + np.exp(-gate)) * up
    assert np.abs(act - want).max() < 0.05 * np.abs(want).max()
    q, k, v = kernels.run_graph(0, "qkv", x)
    assert q.shape == (CHUNK, spec.q_dim) and k.shape == v.shape == (CHUNK, spec.kv_dim)
    stats = kernels.stats()
    assert stats["graph_runs"] == 2 and stats["outliers"] > 0 and stats["input_values"] == 2 * x.size  # gate_up, qkv


def test_npu_prefill_close_to_float_and_shadow_beats_clip(env):
    # every linear input shadowed: a random tiny model has outliers everywhere, unlike SmolLM2
    full = resolved_for(env, "outliers.prune_fraction=0.0")
    kernels = load_npu_kernels(full, compile_artifacts(full, log=lambda m: None, progress=lambda *a: None))
    assert len(kernels.shadowed) == 12
    float_engine = FloatEngine(env[2])
    want = prefill_logits(float_engine)
    got = prefill_logits(NpuPrefillEngine(float_engine, kernels))
    assert got.shape == want.shape == (len(IDS), CFG_vocab(env))
    err_shadow = np.abs(got - want).mean()
    clip = resolved_for(env, "outliers.policy=clip")
    clip_kernels = load_npu_kernels(clip, compile_artifacts(clip, log=lambda m: None, progress=lambda *a: None))
    assert not clip_kernels.shadowed
    err_clip = np.abs(prefill_logits(NpuPrefillEngine(float_engine, clip_kernels)) - want).mean()
    assert err_shadow < 0.1 * np.abs(want).mean()
    assert err_shadow < err_clip  # the correction is what brings it closer to float
    assert (np.argmax(got, 1) == np.argmax(want, 1)).mean() > 0.9


def CFG_vocab(env):
    return env[1].vocab


def test_qnn_htp_simulator_runs_the_graphs_and_agrees_with_ort_cpu(env):
    pytest.importorskip("onnxruntime_qnn")
    qnn = resolved_for(env, backend="qnn-htp")
    artifacts = compile_artifacts(qnn, log=lambda m: None, progress=lambda *a: None)
    assert artifacts.lock.backend == "qnn-htp" and artifacts.lock.htp_arch is not None
    assert artifacts.context_path(0, "down").is_file()  # context binary compiled ahead of time
    kernels = load_npu_kernels(qnn, artifacts)
    cpu = resolved_for(env)
    cpu_kernels = load_npu_kernels(cpu, compile_artifacts(cpu, log=lambda m: None, progress=lambda *a: None))
    float_engine = FloatEngine(env[2])
    ids = IDS[:CHUNK]
    want = prefill_logits(float_engine, ids)
    on_qnn = prefill_logits(NpuPrefillEngine(float_engine, kernels), ids)
    on_cpu = prefill_logits(NpuPrefillEngine(float_engine, cpu_kernels), ids)
    # qnn graphs requantize every linear output to uint8 (HTP needs the Q/DQ unit); ort-cpu keeps
    # them float, so qnn is a little further from float but both follow it.
    scale = np.abs(want).mean()
    assert np.abs(on_qnn - on_cpu).mean() < 0.15 * scale
    assert np.abs(on_cpu - want).mean() < np.abs(on_qnn - want).mean() + 0.02 * scale
    assert (np.argmax(on_qnn, 1) == np.argmax(want, 1)).mean() >= 0.75
