"""`eval` and `build` commands on a tiny model: JSON keys, side-by-side perplexities, located
errors for bad input (exit 2, no traceback)."""

from __future__ import annotations

import json
import math

import pytest
from tiny_models import tiny_npu_sets as sets

from mllm_deploy import cli


@pytest.fixture
def main(private_cache):
    """The CLI's main, run with a cache of the test's own."""
    return cli.main


def test_eval_json_reports_both_perplexities(main, smallest_gguf, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris. The quick brown fox jumps over the lazy dog. " * 4)
    evaluate = ["eval", "--text", str(text), "--max-tokens", "40", "--json"]
    assert main([*evaluate, *sets(smallest_gguf)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"perplexity", "baseline_perplexity", "tokens", "outlier_fraction", "backend"} <= set(report)
    assert report["tokens"] == 40 and report["backend"].startswith("ort-cpu emulation")
    assert report["perplexity"] > 1 and report["baseline_perplexity"] > 1
    # random weights: perplexity is huge; compare mean NLL (log perplexity) instead
    assert abs(math.log(report["perplexity"]) / math.log(report["baseline_perplexity"]) - 1) < 0.05
    assert 0 <= report["outlier_fraction"] < 0.05
    assert report["kv_cache"] == "int8"  # the default: the prefill reads the KV cache back from int8
    assert 0 <= report["kv_saturated_fraction"] < 0.05
    assert main([*evaluate, *sets(smallest_gguf, "decode.kv_cache=float32")]) == 0
    float_kv = json.loads(capsys.readouterr().out)
    assert float_kv["kv_cache"] == "float32" and float_kv["perplexity"] != report["perplexity"]
    assert float_kv["kv_saturated_fraction"] == 0.0
    assert abs(math.log(float_kv["perplexity"]) / math.log(report["perplexity"]) - 1) < 0.02
    assert main([*evaluate, *sets(smallest_gguf, "device.npu_backend=none")]) == 0
    float_only = json.loads(capsys.readouterr().out)
    assert float_only["perplexity"] == float_only["baseline_perplexity"] == pytest.approx(report["baseline_perplexity"])
    assert float_only["outlier_fraction"] == 0.0 and float_only["backend"].startswith("none")


def test_eval_missing_text_is_exit_2_without_traceback(main, smallest_gguf, capsys):
    assert main(["eval", "--text", "/nonexistent/news.txt", *sets(smallest_gguf)]) == 2
    err = capsys.readouterr().err
    assert "text file not found" in err and "/nonexistent/news.txt" in err and "Traceback" not in err


def test_build_prints_the_calibration_and_writes_a_bundle(main, smallest_gguf, tmp_path, capsys):
    # a random tiny model: float perplexity ~1e11 and its path's ~1.15x that, over the default 1.05
    assert main(["build", *sets(smallest_gguf, "accuracy.max_ppl_ratio=2"), "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "shadow outlier execution on" in out and "bundle:" in out and "graphs: 8" in out
    assert (tmp_path / "b" / "bundle.json").is_file()
    assert main(["build", *sets(smallest_gguf, "calibration.source=missing/*.txt")]) == 2
    assert "calibration.source" in capsys.readouterr().err
