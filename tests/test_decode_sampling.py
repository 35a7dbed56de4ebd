"""Sampling math and stop strings."""

from __future__ import annotations

import numpy as np
import pytest

from mllm_deploy.runtime.sampling import (
    Sampler,
    SamplingSettings,
    apply_repetition_penalty,
    softmax,
    top_k_filter,
    top_p_filter,
)
from mllm_deploy.runtime.stop_strings import StopStringFilter

LOGITS = np.array([2.0, -1.0, 0.5, 3.0, -3.0, 1.0], np.float32)


def test_greedy_is_argmax_and_ignores_seed():
    for seed in (0, 1, 99):
        assert Sampler(SamplingSettings(temperature=0.0, seed=seed)).choose(LOGITS) == 3


def test_repetition_penalty_divides_positive_multiplies_negative():
    out = apply_repetition_penalty(LOGITS, [3, 1, 3], 2.0)
    np.testing.assert_allclose(out, [2.0, -2.0, 0.5, 1.5, -3.0, 1.0])
    np.testing.assert_array_equal(apply_repetition_penalty(LOGITS, [3], 1.0), LOGITS)


def test_repetition_penalty_changes_greedy_choice():
    # 3.0 / 2 = 1.5 < 2.0: token 0 wins once token 3 was seen.
    assert Sampler(SamplingSettings(repetition_penalty=2.0)).choose(LOGITS, seen_ids=[3]) == 0


def test_top_k_mask():
    out = top_k_filter(LOGITS, 2)
    assert np.isfinite(out).nonzero()[0].tolist() == [0, 3]
    assert top_k_filter(LOGITS, 0) is LOGITS


def test_top_p_keeps_smallest_set_reaching_p():
    probs = softmax(LOGITS)  # sorted: 3 (.58), 0 (.21), 5 (.08), 2 (.05), ...
    order = np.argsort(-probs)
    for p in (0.1, 0.5, 0.7, 0.85, 0.95):
        kept = np.isfinite(top_p_filter(LOGITS, p)).nonzero()[0]
        n_expected = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
        assert sorted(kept.tolist()) == sorted(order[:n_expected].tolist()), p
        assert probs[kept].sum() >= p
    assert np.isfinite(top_p_filter(LOGITS, 0.01)).sum() == 1


def test_probabilities_combine_temperature_top_k_top_p():
    sampler = Sampler(SamplingSettings(temperature=0.5, top_k=3, top_p=0.9))
    probs = sampler.probabilities(LOGITS)
    scaled = softmax(LOGITS[[0, 3, 5]] / 0.5)  # top-3, temperature 0.5
    # top-p 0.9 over those: token 3 (.84) alone is short of 0.9, with token 0 it reaches it
    assert scaled[1] < 0.9 < scaled[1] + scaled[0]
    want = np.zeros(6)
    want[[3, 0]] = scaled[[1, 0]] / (scaled[1] + scaled[0])
    np.testing.assert_allclose(probs, want, atol=1e-6)


def test_seeded_sampling_is_reproducible_and_follows_distribution():
    settings = SamplingSettings(temperature=1.0, seed=1234)
    s1, s2 = Sampler(settings), Sampler(settings)
    assert [s1.choose(LOGITS) for _ in range(200)] == [s2.choose(LOGITS) for _ in range(200)]
    s = Sampler(SamplingSettings(temperature=1.0, seed=7))
    counts = np.bincount([s.choose(LOGITS) for _ in range(4000)], minlength=6) / 4000
    np.testing.assert_allclose(counts, softmax(LOGITS), atol=0.03)


def test_different_seeds_give_different_sequences():
    s_a, s_b = Sampler(SamplingSettings(temperature=1.5, seed=1)), Sampler(SamplingSettings(temperature=1.5, seed=2))
    assert [s_a.choose(LOGITS) for _ in range(50)] != [s_b.choose(LOGITS) for _ in range(50)]


def test_top_k_sampling_never_leaves_the_top_k():
    s = Sampler(SamplingSettings(temperature=2.0, top_k=2, seed=3))
    assert {s.choose(LOGITS) for _ in range(300)} == {0, 3}


def feed_all(stop, pieces):
    f = StopStringFilter(stop)
    shown = []
    for piece in pieces:
        shown.append(f.feed(piece))
        if f.stopped:
            break
    tail = f.flush()
    return shown, tail, f.stopped


@pytest.mark.parametrize(
    "pieces, shown, tail, stopped",
    [
        (["Hello", " wor", "ld"], ["Hello", " wor", "ld"], "", False),
        (["Hello", " ST", "OP", " more"], ["Hello", " ", ""], "", True),
        (["abc", "S", "T", "x"], ["abc", "", "", "STx"], "", False),
        (["abcST"], ["abc"], "ST", False),
        (["xxSTOPyy"], ["xx"], "", True),
        (["S", "TO", "P"], ["", "", ""], "", True),
        (["<", "end>"], ["", ""], "", True),
        (["a<e", "nd", ">b"], ["a", "", ""], "", True),
    ],
)
def test_stop_strings_across_tokens(pieces, shown, tail, stopped):
    got_shown, got_tail, got_stopped = feed_all(["STOP", "<end>"], pieces)
    assert got_shown == shown
    assert got_tail == tail
    assert got_stopped == stopped
    assert not any("STOP" in s or "<end>" in s for s in got_shown)


def test_stop_at_earliest_of_several_matches():
    f = StopStringFilter(["world", "lo w"])
    assert f.feed("hello world") == "hel" and f.stopped


def test_no_stop_strings_passes_everything():
    f = StopStringFilter([])
    assert f.feed("abc") == "abc" and f.flush() == ""
