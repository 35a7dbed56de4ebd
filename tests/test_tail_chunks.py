"""Tail chunks end to end on a tiny model's real ort-cpu artifacts: a prompt's last tokens run on
the graphs at the tail's static size (one session per graph behind both sizes), and the result is
the full-chunk path's."""

from __future__ import annotations

import numpy as np

from mllm_deploy.interface.deployment import load_deployment
from mllm_deploy.interface.engines import load_deployment_weights, open_deployment_engine

CHUNK, TAIL = 16, 8
SETS = [
    f"prefill.chunk_size={CHUNK}",
    "prefill.max_context=128",
    "calibration.samples=1",
    "calibration.tokens_per_sample=16",
    "outliers.scale_percentile=99.0",
    "device.npu_backend=ort-cpu",
    "decode.kv_cache=float32",
]


def _engine(model, tail: int):
    deployment = load_deployment(None, [f"model.source={model}", *SETS, f"prefill.tail_chunk_size={tail}"], to_run=True)
    return open_deployment_engine(deployment, load_deployment_weights(deployment.running), log=lambda *a, **k: None)


def test_tail_chunks_run_the_tail_graphs_and_match_full_chunks(private_cache, smallest_gguf):
    ids = [int(i) for i in np.random.default_rng(7).integers(3, 200, size=CHUNK + 5)]  # 16 + 5
    with_tail, without = _engine(smallest_gguf, TAIL), _engine(smallest_gguf, 0)
    try:
        kernels = with_tail.prefill.kernels
        assert kernels.tail_chunk_tokens == TAIL and without.prefill.kernels.tail_chunk_tokens == 0
        full, tail = kernels._by_rows[CHUNK][(0, "qkv")], kernels._by_rows[TAIL][(0, "qkv")]
        assert full.impl is tail.impl  # one session, one copy of the weights
        assert {s[0] for s in tail.inputs.values()} == {TAIL}
        assert with_tail.describe()["prefill"].endswith(f"tail chunks of {TAIL}")
        assert with_tail.prefill.chunk_rows(len(ids)) == (CHUNK, TAIL)
        assert without.prefill.chunk_rows(len(ids)) == (CHUNK, CHUNK)
        logits = {}
        for name, engine in (("tail", with_tail), ("full", without)):
            cache = engine.new_cache(64)
            kernels_of = engine.prefill.kernels
            kernels_of.reset_stats()
            out = list(engine.prefill_chunks(cache, ids, chunk_size=CHUNK))
            assert [done.tokens for done, _ in out] == [CHUNK, 5] and cache.token_ids == ids
            logits[name] = out[-1][1]
            n_graphs = len(kernels_of.handles)
            assert kernels_of.stats()["graph_runs"] == 2 * n_graphs
            # input values the NPU graphs saw: the tail chunk's 8 rows instead of 16
            rows = TAIL if name == "tail" else CHUNK
            assert kernels_of.stats()["input_values"] == (CHUNK + rows) * sum(
                next(iter(h.inputs.values()))[1] for h in kernels_of.handles.values()
            )
        np.testing.assert_allclose(logits["tail"], logits["full"], rtol=1e-4, atol=1e-4)
    finally:
        with_tail.close()
        without.close()
