"""Telemetry from measured spans: busy fractions, lanes, timed events, progress, session totals."""

from __future__ import annotations

import os

import pytest

from mllm_deploy.events import ChunkDone, GenerationDone, GenerationMetrics, SubgraphFinished, SubgraphStarted
from mllm_deploy.runtime.telemetry import (
    PrefillProgress,
    ProcessSampler,
    SessionMetrics,
    UtilizationTracker,
    timed_events,
)


@pytest.mark.parametrize(
    "spans, now, window, slots, expected",
    [
        ([], 10.0, 1.0, 1, 0.0),
        ([(9.0, 10.0)], 10.0, 1.0, 1, 1.0),
        ([(9.5, 10.0)], 10.0, 1.0, 1, 0.5),
        ([(8.0, 9.25)], 10.0, 1.0, 1, 0.25),  # clipped to the window
        ([(9.0, 9.5), (9.75, 10.0)], 10.0, 1.0, 1, 0.75),
        ([(9.0, 10.0), (9.0, 10.0)], 10.0, 1.0, 2, 1.0),  # two CPU threads both busy
        ([(9.0, 10.0)], 10.0, 1.0, 2, 0.5),  # one of two threads busy
        ([(9.0, 10.0), (9.0, 10.0)], 10.0, 1.0, 1, 1.0),  # never above 1
        ([(1.0, 2.0)], 10.0, 2.0, 1, 0.0),  # outside the window
    ],
)
def test_busy_fraction_from_spans(spans, now, window, slots, expected):
    tracker = UtilizationTracker(slots={"cpu": slots})
    for start, end in spans:
        tracker.add_span("cpu", "work", start, end)
    assert tracker.busy_fraction("cpu", now, window) == pytest.approx(expected)


def test_open_span_counts_until_now_and_closes():
    tracker = UtilizationTracker()
    tracker.started("npu", "c0.L0.qkv", 9.5)
    assert tracker.running("npu") == ["c0.L0.qkv"]
    assert tracker.busy_fraction("npu", 10.0, 1.0) == pytest.approx(0.5)
    tracker.finished("npu", "c0.L0.qkv", 9.75)
    assert tracker.running("npu") == []
    assert tracker.busy_fraction("npu", 10.0, 1.0) == pytest.approx(0.25)
    assert tracker.last_finished("npu").label == "c0.L0.qkv"
    tracker.started("cpu", "engine", 9.9)
    tracker.close_all(10.0)
    assert tracker.running("cpu") == [] and tracker.busy_fraction("cpu", 10.0, 1.0) == pytest.approx(0.1)


def test_lane_cells_are_busy_fraction_per_slice():
    tracker = UtilizationTracker(slots={"cpu": 2})
    tracker.add_span("cpu", "chunk", 1.0, 2.5)
    tracker.add_span("cpu", "decode", 2.5, 3.0, width=2)
    tracker.add_span("cpu", "old", -5.0, -4.0)
    tracker.started("cpu", "attention", 3.5)
    assert tracker.lane("cpu", 4.0, 4.0, 4) == pytest.approx([0.0, 0.5, 0.75, 0.25])
    for i, cell in enumerate(tracker.lane("cpu", 4.0, 4.0, 4)):  # the same as busy_fraction per slice
        assert cell == pytest.approx(tracker._busy_seconds("cpu", float(i), i + 1.0) / 2)


def test_old_spans_are_dropped_after_keep_seconds():
    tracker = UtilizationTracker(keep_seconds=10.0)
    tracker.add_span("npu", "a", 0.0, 1.0)
    tracker.add_span("npu", "b", 20.0, 21.0)
    assert [s.label for s in tracker._spans["npu"]] == ["b"]


def test_observe_subgraph_events_uses_their_measured_times():
    tracker = UtilizationTracker()
    assert tracker.observe(SubgraphStarted("c2.L7.gate_up", "npu", 2, 7, "gate_up", 9.0))
    assert tracker.running("npu") == ["c2.L7.gate_up"]
    assert tracker.busy_fraction("npu", 10.0, 1.0) == pytest.approx(1.0)
    assert tracker.observe(SubgraphFinished("c2.L7.gate_up", "npu", 2, 7, "gate_up", 9.0, 9.5))
    assert tracker.running("npu") == []
    assert tracker.busy_fraction("npu", 10.0, 1.0) == pytest.approx(0.5)
    # a finished event whose start was never seen still counts its measured span
    assert tracker.observe(SubgraphFinished("c2.L7.attention", "cpu", 2, 7, "attention", 9.75, 10.0))
    assert tracker.busy_fraction("cpu", 10.0, 1.0) == pytest.approx(0.25)
    assert not tracker.observe(ChunkDone(0, 1, 8, 0.1))


def test_timed_events_measure_time_inside_the_generator():
    ticks = iter([0.0, 1.0, 1.5, 4.0, 4.2])
    started = []

    def events():
        yield "a"
        yield "b"

    timed = list(timed_events(events(), clock=lambda: next(ticks), on_start=started.append))
    assert [(t.event, t.busy_start, t.busy_end) for t in timed] == [("a", 0.0, 1.0), ("b", 1.5, 4.0)]
    assert started == [0.0, 1.5, 4.2]


def test_prefill_progress_eta_from_wall_time():
    progress = PrefillProgress(started_at=100.0)
    assert progress.eta_seconds is None and progress.tokens_per_s is None
    # out of order, chunk spans overlap: their own seconds (0.9 + 0.8) exceed the wall time (1.2)
    progress.update(ChunkDone(0, 4, 256, 0.9), now=100.7)
    progress.update(ChunkDone(1, 4, 256, 0.8), now=101.2)
    assert (progress.chunks_done, progress.n_chunks, progress.tokens_done) == (2, 4, 512)
    assert progress.eta_seconds == pytest.approx(2 * 0.6)
    assert progress.tokens_per_s == pytest.approx(512 / 1.2)


def _done(prefilled, reused, generated, prefill_s, decode_s, ttft_ms, reason="eos"):
    metrics = GenerationMetrics(
        ttft_ms, prefill_s, prefilled / prefill_s, decode_s, (generated - 1) / decode_s if generated > 1 else None
    )
    return GenerationDone("x", reason, prefilled + reused, reused, prefilled, 0, generated, metrics=metrics)


def test_session_metrics_totals():
    metrics = SessionMetrics()
    metrics.record(_done(100, 0, 11, 0.5, 1.0, 520.0))
    metrics.record(_done(20, 110, 1, 0.1, 0.0, 110.0, reason="cancelled"))
    metrics.record_prefill(_done(300, 0, 1, 1.0, 0.0, 1000.0))
    assert (metrics.turns, metrics.cancelled_turns) == (2, 1)
    assert metrics.prefilled_tokens == 420 and metrics.reused_tokens == 110
    assert metrics.prefill_tokens_per_s == pytest.approx(420 / 1.6)
    assert metrics.decode_tokens_per_s == pytest.approx(10 / 1.0)
    assert metrics.mean_ttft_ms == pytest.approx(315.0)


def test_process_sampler_reports_this_process():
    sampler = ProcessSampler(os.getpid())
    sum(i * i for i in range(200_000))  # some CPU time to measure
    sample = sampler.sample()
    assert sample.rss_bytes > 10 * 1024**2
    assert sample.cpu_percent >= 0.0
    assert sample.cores >= 1
