"""Calibration mechanics: exact streaming percentiles, hot channels, clamps per policy, shadowed layers."""

import math

import numpy as np
import pytest

from mllm_deploy.compile.calibrate import _TopValues
from mllm_deploy.compile.calibration import (
    ActivationStats,
    InputStats,
    KVAbsMax,
    choose_hot_channels,
    derive_calibration,
)
from mllm_deploy.compile.calibration_text import text_file_tokens
from mllm_deploy.errors import UserError
from mllm_deploy.model.linears import GRAPH_KINDS


@pytest.mark.parametrize("percentile", [99.99, 99.0, 90.0])
def test_streaming_top_values_give_the_exact_percentile_and_channel_counts(percentile):
    rng = np.random.default_rng(1)
    chunks = [rng.standard_normal((50, 32)).astype(np.float32) * (1 + 20 * (rng.random(32) < 0.1)) for _ in range(5)]
    everything = np.abs(np.concatenate(chunks))  # [250, 32]
    n = everything.size
    k = n - math.ceil(percentile / 100 * n) + 1
    top = _TopValues(k, 32, 1)
    for c in chunks:
        top.add(c)
    stats = top.result(0, "qkv")
    ordered = np.sort(everything.reshape(-1))
    assert stats.percentile_clamp == pytest.approx(ordered[math.ceil(percentile / 100 * n) - 1])
    assert stats.max_abs == pytest.approx(ordered[-1])
    beyond = everything > stats.percentile_clamp
    want = {c: int(v) for c, v in enumerate(beyond.sum(axis=0)) if v}
    assert stats.channel_outliers == want
    assert stats.values == n


def test_hot_channels_smallest_set_for_most_outliers_capped():
    counts = {5: 50, 9: 30, 1: 10, 2: 5, 3: 5}  # 100 outliers
    assert choose_hot_channels(counts, 100, 0.03) == ([5, 9], 0.8)  # 80% reached with two channels
    assert choose_hot_channels(counts, 100, 0.01) == ([5], 0.5)  # capped at one channel
    assert choose_hot_channels(counts, 100, 0.0) == ([], 0.0)
    assert choose_hot_channels({}, 100, 0.5) == ([], 0.0)


def _stats(n_layers=4, damage=None):
    inputs = []
    for layer in range(n_layers):
        for kind in GRAPH_KINDS:
            big = 100.0 * (layer + 1) if kind == "down" else 2.0
            grid_damage = (damage or {}).get((layer, kind), big / 1000)
            inputs.append(
                InputStats(
                    layer=layer,
                    kind=kind,
                    width=8,
                    values=800,
                    percentile_clamp=1.0,
                    max_abs=big,
                    channel_outliers={3: 2, 5: 1},
                    grid_damage=grid_damage,
                )
            )
    outs = {
        f"{layer}/{n}": 10.0
        for layer in range(n_layers)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    }
    clamped = {k: 3.0 for k in outs}
    kv = KVAbsMax(keys=[[[1.0] * 4] * 2] * n_layers, values=[[[0.5] * 4] * 2] * n_layers)
    return ActivationStats(
        source="self",
        text_sha256="0" * 64,
        samples=1,
        tokens=100,
        scale_percentile=99.9,
        inputs=inputs,
        output_max=outs,
        output_max_clamped=clamped,
        kv_absmax=kv,
        seconds=0.0,
    )


def test_policies_choose_clamps_and_shadowed_layers():
    stats = _stats()
    shadow = derive_calibration(
        stats, policy="shadow", activations="uint8", hot_channel_fraction=0.5, shadow_input_count=2
    )
    assert shadow.layer_rank == [3, 2, 1, 0]  # down input max 400, 300, ... over the same clamp
    assert shadow.shadow_layers == [2, 3]
    assert shadow.shadow_inputs == [(2, "down"), (3, "down")]  # ranked over every input, not whole layers
    assert shadow.shadowed == frozenset({(2, "down"), (3, "down")})
    assert shadow.input(3, "qkv").hot_channels == []  # same layer, input pruned
    assert shadow.input(3, "down").clamp == 1.0 and shadow.input(3, "down").importance == pytest.approx(400 * 127)
    assert shadow.input(3, "down").hot_channels == [3, 5]  # 2 of 3 outliers in ch 3 < 80%, so ch 5 too
    assert shadow.input(0, "down").hot_channels == []  # not shadowed
    assert shadow.output_clamps["3/ffn_down"] == 3.0  # the NPU sees clamped inputs
    # pruned inputs are not clipped: max-abs grid, full-range output
    assert shadow.input(0, "down").clamp == shadow.input(0, "down").max_abs
    assert shadow.input(0, "qkv").outlier_fraction == 0.0
    assert shadow.output_clamps["0/ffn_down"] == 10.0
    clip = derive_calibration(stats, policy="clip", activations="uint8", hot_channel_fraction=0.5, shadow_input_count=2)
    assert clip.shadow_layers == [] and clip.input(3, "down").clamp == 1.0
    assert clip.input(0, "qkv").outlier_fraction == pytest.approx(3 / 800)
    assert clip.output_clamps["0/ffn_down"] == 3.0
    none = derive_calibration(
        stats, policy="none", activations="uint16", hot_channel_fraction=0.5, shadow_input_count=2
    )
    assert none.input(3, "down").clamp == 400.0 and none.input(3, "down").outlier_fraction == 0.0
    assert none.output_clamps["0/ffn_down"] == 10.0 and none.shadow_layers == []
    assert none.input(3, "down").importance == pytest.approx(32767)


def test_pruning_ranks_by_measured_damage_not_max_over_scale():
    # layer 0's qkv input has the smallest max |x| / clamp but the largest measured damage
    stats = _stats(damage={(0, "qkv"): 5.0})
    shadow = derive_calibration(
        stats, policy="shadow", activations="uint8", hot_channel_fraction=0.5, shadow_input_count=2
    )
    assert shadow.shadow_inputs == [(0, "qkv"), (3, "down")]
    assert shadow.input(2, "down").clamp == 300.0  # pruned, although its importance is higher than (0, qkv)'s
    assert shadow.input(2, "down").importance > shadow.input(0, "qkv").importance
    # pruning damage: the measured damage less what the clamp grid keeps, (1 - (clamp / max_abs)^2)
    assert shadow.input(0, "qkv").pruning_damage == pytest.approx(5.0 * (1 - (1 / 2) ** 2))
    assert shadow.input(3, "down").pruning_damage == pytest.approx(0.4 * (1 - (1 / 400) ** 2))


def test_grid_damage_pass_measures_each_input_on_a_tiny_model(tmp_path):
    import tiny_models

    from mllm_deploy.compile.calibrate import collect_activation_stats
    from mllm_deploy.forward.float_engine import FloatEngine
    from mllm_deploy.model import load_weights, read_spec

    cfg = tiny_models.TinyConfig(n_layers=2, hidden=64, ffn=128, n_heads=4, n_kv_heads=2, context=256)
    spec = read_spec(str(tiny_models.write_tiny_gguf(tmp_path, tied=False, cfg=cfg)))
    engine = FloatEngine(load_weights(spec, use_cache=False))
    samples = [[3 + (i * 7 + j) % 250 for i in range(24)] for j in range(2)]
    stats = collect_activation_stats(engine, samples, 99.0, source="self", chunk_size=8)
    damage = {(s.layer, s.kind): s.grid_damage for s in stats.inputs}
    assert len(damage) == 2 * len(GRAPH_KINDS) and all(d > 0 for d in damage.values())
    assert all(d < 1 for d in damage.values())  # 8-bit rounding moves the residual stream by far less than itself
    again = collect_activation_stats(engine, samples, 99.0, source="self", chunk_size=8)
    assert [s.grid_damage for s in again.inputs] == [s.grid_damage for s in stats.inputs]  # deterministic
    # the probes leave the KV cache as the float pass writes it: chunked equals one-chunk statistics
    assert [
        s.max_abs for s in collect_activation_stats(engine, samples, 99.0, source="self", chunk_size=24).inputs
    ] == pytest.approx([s.max_abs for s in stats.inputs], rel=1e-5)


class _Tok:
    def encode(self, text, allow_special=False):
        return [ord(c) for c in text]


def test_text_file_source_cuts_samples_and_missing_file_is_located(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 50)
    (tmp_path / "b.txt").write_text("y" * 50)
    samples = text_file_tokens("*.txt", _Tok(), samples=3, tokens_per_sample=40, base_dir=tmp_path)
    assert [len(s) for s in samples] == [40, 40, 22]  # 50 + "\n\n" + 50 = 102 tokens
    with pytest.raises(UserError) as caught:
        text_file_tokens("missing.txt", _Tok(), 2, 16, tmp_path)
    assert caught.value.exit_code == 2 and caught.value.diagnostics[0].key == "calibration.source"


@pytest.mark.parametrize("rope_style", ["adjacent", "half"])
def test_kv_range_takes_rope_pair_norms_for_keys_and_channel_maxima_for_values(rope_style):
    """A key pair's norm bounds both of its channels at every position (RoPE only rotates the
    pair), so calibration records it for both; values take the plain per-channel max."""
    from types import SimpleNamespace

    from mllm_deploy.compile.calibrate import _KVRange

    spec = SimpleNamespace(rope_style=rope_style, n_layers=1, n_kv_heads=1, head_dim=4)
    pair = (0, 1) if rope_style == "adjacent" else (0, 2)
    k = np.zeros((1, 1, 3, 4), np.float32)
    k[0, 0, 0, pair[0]], k[0, 0, 0, pair[1]] = 3.0, -4.0  # norm 5
    k[0, 0, 1, pair[0]] = 1.0
    v = np.zeros_like(k)
    v[0, 0, 2] = [1.0, -2.0, 0.5, 0.0]
    kv = _KVRange(spec)
    kv.add(SimpleNamespace(length=3, k=k, v=v))
    kv.add(SimpleNamespace(length=2, k=k * 0.5, v=v * 3))  # position 2 not held: its v is not counted
    result = kv.result()
    assert result.keys[0][0][pair[0]] == pytest.approx(5.0) and result.keys[0][0][pair[1]] == pytest.approx(5.0)
    assert result.values[0][0] == pytest.approx([1.0, 2.0, 0.5, 0.0])


def test_statistics_do_not_depend_on_cores_blocks_or_kept_activations(tmp_path, monkeypatch):
    """Layer by layer over blocks of samples on 1 or 3 threads, activations kept or recomputed:
    the same statistics, value for value (chunked samples of different lengths)."""
    import tiny_models

    from mllm_deploy.compile import calibrate
    from mllm_deploy.compile.parallel import BuildPool
    from mllm_deploy.forward.float_engine import FloatEngine
    from mllm_deploy.model import load_weights, read_spec

    cfg = tiny_models.TinyConfig(n_layers=2, hidden=64, ffn=128, n_heads=4, n_kv_heads=2, context=256)
    spec = read_spec(str(tiny_models.write_tiny_gguf(tmp_path, tied=False, cfg=cfg)))
    engine = FloatEngine(load_weights(spec, use_cache=False))
    samples = [[3 + (i * 7 + j * 5) % 250 for i in range(20 + 3 * j)] for j in range(5)]

    def stats(workers):
        with BuildPool(workers) as pool:
            result = calibrate.collect_activation_stats(engine, samples, 99.0, source="self", chunk_size=8, pool=pool)
        return result.model_dump(exclude={"seconds"})

    whole = stats(1)  # one block
    monkeypatch.setattr(calibrate, "BLOCK_TOKENS", 45)  # blocks of one or two whole samples
    assert len(calibrate.blocks_of(samples, 8)) == 4
    one = stats(1)
    monkeypatch.setattr(calibrate, "KEEP_BYTES", 0)  # the probes recompute the float layer
    assert stats(3) == one
    assert one["tokens"] == sum(len(s) for s in samples) and all(i["grid_damage"] > 0 for i in one["inputs"])
    # other blocks: products of other row counts, equal up to float rounding (OpenBLAS small-matrix kernel;
    # a rounding step of the fake-quantized input that flips moves a small damage by up to 0.1%)
    assert [i["grid_damage"] for i in one["inputs"]] == pytest.approx(
        [i["grid_damage"] for i in whole["inputs"]], rel=1e-2
    )
    assert one["output_max_clamped"] == pytest.approx(whole["output_max_clamped"], rel=1e-5)


def test_self_generated_text_is_the_same_on_one_or_several_threads(tmp_path):
    import tiny_models

    from mllm_deploy.compile.calibration_text import self_generated_tokens
    from mllm_deploy.compile.parallel import BuildPool
    from mllm_deploy.forward.float_engine import FloatEngine
    from mllm_deploy.model import load_weights, read_spec

    cfg = tiny_models.TinyConfig(n_layers=2, hidden=64, ffn=128, n_heads=4, n_kv_heads=2, context=256)
    spec = read_spec(str(tiny_models.write_tiny_gguf(tmp_path, tied=False, cfg=cfg)))
    engine = FloatEngine(load_weights(spec, use_cache=False))

    class Tok:
        eos_ids, bos_id = (2,), 1

        def encode(self, text, allow_special=False):
            return [3 + ord(c) % 200 for c in text][: 5 + len(text) % 7]

    texts = []
    for workers in (1, 2):
        with BuildPool(workers) as pool:
            texts.append(self_generated_tokens(engine, Tok(), 4, 24, pool=pool))
    assert texts[0] == texts[1]
    assert [len(s) for s in texts[0]] == [24] * 4 and not {1, 2} & {t for s in texts[0] for t in s[12:]}
