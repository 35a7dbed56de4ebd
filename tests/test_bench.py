"""`bench` on a tiny model: rows with the documented keys, settings from sweeps, traces, errors."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import pytest
import tiny_models

from mllm_deploy.bench.prompt_text import package_prose, prompt_ids
from mllm_deploy.bench.runner import expand_sweeps, render_csv, render_table
from mllm_deploy.cli import bench_cmd
from mllm_deploy.errors import UserError

ROW_KEYS = {
    "settings",
    "prompt_tokens",
    "ttft_ms",
    "prefill_tokens_per_s",
    "prefill_tokens_per_s_spread",
    "decode_tokens_per_s",
    "peak_rss_mb",
    "utilization",
    "backend",
    "profile_hash",
    "host",
    "trace",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_models.write_tiny_gguf(tmp_path_factory.mktemp("tiny"), tied=True)


def bench(argv, capsys):
    parser = argparse.ArgumentParser()
    bench_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["bench", *argv])
    code = args.func(args)
    return code, capsys.readouterr()


def test_sweeps_expand_to_the_cartesian_product():
    assert expand_sweeps(["a=1,2", "b=x,y,z"]) == [
        {"a": "1", "b": "x"},
        {"a": "1", "b": "y"},
        {"a": "1", "b": "z"},
        {"a": "2", "b": "x"},
        {"a": "2", "b": "y"},
        {"a": "2", "b": "z"},
    ]
    assert expand_sweeps([]) == [{}]  # no sweep: one configuration
    for bad in (["a"], ["a=1,,2"], ["=1"], ["a=1", "a=2"]):
        with pytest.raises(UserError):
            expand_sweeps(bad)


def test_prompt_is_real_text_of_exact_length():
    from tokenizers import Tokenizer  # noqa: F401

    prose = package_prose()
    assert "chunk" in prose and "scheduler" in prose.lower() and len(prose) > 10_000

    class Words:
        def encode(self, text):
            return [len(w) for w in text.split()]

    assert len(prompt_ids(Words(), 5000)) == 5000


def test_bench_json_rows_carry_settings_and_measurements(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLLM_DEPLOY_CACHE", str(tmp_path / "cache"))
    trace = tmp_path / "trace.json"
    code, out = bench(
        [
            "--set",
            f"model.source={tiny}",
            "--set",
            "device.npu_backend=none",
            "--set",
            "prefill.max_context=256",
            "--prompt-tokens",
            "64",
            "--gen-tokens",
            "4",
            "--repeat",
            "2",
            "--warmup",
            "0",
            "--sweep",
            "prefill.chunk_size=16,32",
            "--json",
            "--trace",
            str(trace),
        ],
        capsys,
    )
    assert code == 0
    rows = json.loads(out.out)
    assert [r["settings"] for r in rows] == [{"prefill.chunk_size": "16"}, {"prefill.chunk_size": "32"}]
    for row, chunk in zip(rows, (16, 32), strict=True):
        assert set(row) >= ROW_KEYS
        assert row["prompt_tokens"] == 64 and row["chunk_size"] == chunk and row["repeat"] == 2
        spread = row["prefill_tokens_per_s_spread"]
        assert 0 < spread["min"] <= row["prefill_tokens_per_s"] <= spread["max"]
        assert row["decode_tokens_per_s"] > 0 and row["ttft_ms"] > 0 and row["peak_rss_mb"] > 10
        assert row["backend"] == {
            "npu": "none",
            "prefill": "cpu-float32-numpy",
            "attention": "float32",
            "decode": "cpu-float32-numpy",
        }
        assert row["utilization"]["cpu"] == pytest.approx(1.0)
        assert len(row["profile_hash"]) == 12 and row["host"]["usable_cpus"] >= 1
        data = json.loads(Path(row["trace"]).read_text())
        assert any(e["ph"] == "X" and e["name"].startswith("prefill chunk") for e in data["traceEvents"])
    assert rows[0]["profile_hash"] != rows[1]["profile_hash"]
    assert rows[0]["trace"] != rows[1]["trace"]
    # the other renderings show the same rows
    table = render_table(rows)
    assert "prefill.chunk_size" in table.splitlines()[0] and len(table.splitlines()) == 4
    parsed = list(csv.DictReader(io.StringIO(render_csv(rows))))
    assert [p["settings.prefill.chunk_size"] for p in parsed] == ["16", "32"]
    assert float(parsed[0]["prefill_tokens_per_s"]) == rows[0]["prefill_tokens_per_s"]


def test_a_bad_sweep_value_fails_before_anything_runs(tiny, capsys):
    with pytest.raises(UserError) as err:
        bench(
            [
                "--set",
                f"model.source={tiny}",
                "--set",
                "prefill.max_context=256",
                "--sweep",
                "prefill.chunk_size=16,0",
                "--json",
            ],
            capsys,
        )
    assert "prefill.chunk_size" in err.value.diagnostics[0].render()
