"""`mllm-deploy run` end to end in a subprocess, on the real default model."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
import tiny_models

FLOAT = ["--set", "device.npu_backend=none", "--set", "decode.temperature=0"]
METRIC_KEYS = {"load_s", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb"}


def mllm(*args, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mllm_deploy", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_run_answers_capital_of_france():
    proc = mllm("run", *FLOAT, "--prompt", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "The capital of France is Paris.\n"
    metrics = proc.stderr.strip().splitlines()[-1]
    assert "prompt 37 tokens" in metrics and "generated 8 (eos)" in metrics and "backend none" in metrics


@pytest.mark.slow
def test_run_json_reports_result_and_measured_metrics(tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("What is the capital of France?")
    proc = mllm("run", *FLOAT, "--prompt-file", str(prompt_file), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"text", "prompt_tokens", "generated_tokens", "finish_reason", "backend", "metrics"} <= set(result)
    assert result["text"] == "The capital of France is Paris."
    assert (result["prompt_tokens"], result["generated_tokens"], result["finish_reason"]) == (37, 8, "eos")
    assert result["backend"] == "none"
    metrics = result["metrics"]
    assert set(metrics) == METRIC_KEYS
    assert all(isinstance(metrics[k], float) and metrics[k] > 0 for k in METRIC_KEYS)
    assert metrics["peak_rss_mb"] > 100  # at least the float32 weights of the output head and a few layers


@pytest.mark.slow
def test_run_raw_continues_text_and_respects_max_new_tokens():
    proc = mllm(
        "run", *FLOAT, "--raw", "--prompt", "The quick brown fox jumps over the lazy", "--max-new-tokens", "1", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["text"] == " dog" and result["prompt_tokens"] == 8
    assert result["generated_tokens"] == 1 and result["finish_reason"] == "length"


@pytest.mark.slow
def test_batch_runs_every_line_and_reports_bad_ones(tmp_path):
    lines = [
        json.dumps({"prompt": "What is the capital of France?", "id": "a"}),
        "{not json",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "The capital of France is Paris."},
                    {"role": "user", "content": "And of Germany?"},
                ]
            }
        ),
        "",
        json.dumps({"prompt": "The quick brown fox jumps over the lazy", "raw": True, "max_new_tokens": 1}),
        json.dumps({"prompt": "hi", "temperature": 2}),
    ]
    batch = tmp_path / "requests.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    proc = mllm("run", *FLOAT, "--batch", str(batch))
    assert proc.returncode == 2, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 5, 6]
    assert out[0]["id"] == "a" and out[0]["text"] == "The capital of France is Paris."
    assert "not valid JSON" in out[1]["error"] and "text" not in out[1]
    assert "Berlin" in out[2]["text"] and out[2]["finish_reason"] == "eos"
    assert out[3]["text"] == " dog" and out[3]["finish_reason"] == "length"
    assert "unknown key(s) temperature" in out[4]["error"]
    assert set(out[0]["metrics"]) == METRIC_KEYS


@pytest.mark.slow
def test_overflow_error_exits_2_naming_limit_and_length():
    proc = mllm("run", *FLOAT, "--set", "prefill.max_context=16", "--prompt", "What is the capital of France?")
    assert proc.returncode == 2
    assert "the prompt is 37 tokens, longer than prefill.max_context = 16" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_overflow_truncate_left_runs():
    proc = mllm(
        "run",
        *FLOAT,
        "--set",
        "prefill.max_context=32",
        "--set",
        "prefill.overflow=truncate-left",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["prompt_tokens"] == 28 and result["truncated_tokens"] == 37 - 28
    assert result["generated_tokens"] <= 4


def test_usage_errors_exit_2(tmp_path):
    proc = mllm("run", "--set", "device.npu_backend=none", "--prompt-file", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "prompt file not found" in proc.stderr
    proc = mllm("run", "--set", "device.npu_backend=none")
    assert proc.returncode == 2 and "one of the arguments" in proc.stderr


@pytest.mark.slow
def test_ctrl_c_stops_with_partial_result_and_exit_130(tmp_path):
    counting = ", ".join(str(i) for i in range(1, 40)) + ","
    proc = subprocess.Popen(
        [sys.executable, "-m", "mllm_deploy", "run", *FLOAT, "--raw", "--prompt", counting, "--max-new-tokens", "3000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.read(1)  # generation has started
    proc.send_signal(signal.SIGINT)
    _rest, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert first  # the partial text streamed so far (may be a single space)
    generated = re.search(r"generated (\d+) \(cancelled\)", stderr.strip().splitlines()[-1])
    assert generated and 1 <= int(generated.group(1)) < 3000
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_run_on_a_tiny_hf_model(tmp_path):
    model_dir = tiny_models.write_tiny_hf(tmp_path / "tiny", arch="qwen2", tied=False)
    proc = mllm(
        "run",
        "--set",
        f"model.source={model_dir}",
        "--set",
        "device.npu_backend=none",
        "--set",
        "prefill.max_context=128",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["generated_tokens"] <= 5 and result["prompt_tokens"] > 3


@pytest.mark.parametrize(
    "line, message",
    [
        ('["a"]', "expected a JSON object"),
        ('{"prompt": "a", "messages": []}', "exactly one of 'prompt' or 'messages'"),
        ("{}", "exactly one of 'prompt' or 'messages'"),
        ('{"prompt": ""}', "non-empty string"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "'messages' must be"),
        ('{"messages": [{"role": "user", "content": "x"}], "raw": true}', "cannot be combined with 'messages'"),
        ('{"prompt": "a", "raw": "yes"}', "'raw' must be true or false"),
        ('{"prompt": "a", "raw": true, "system": "s"}', "cannot be combined with a raw prompt"),
        ('{"prompt": "a", "max_new_tokens": 0}', "'max_new_tokens' must be an integer >= 1"),
        ('{"prompt": "a", "max_new_tokens": true}', "'max_new_tokens' must be an integer >= 1"),
    ],
)
def test_batch_line_validation(line, message):
    from mllm_deploy.errors import UserError
    from mllm_deploy.interface.batch import parse_batch_line

    with pytest.raises(UserError) as caught:
        parse_batch_line(line, 7)
    assert str(caught.value).startswith("error: line 7: ") and message in str(caught.value)


def test_batch_line_accepts_valid_requests():
    from mllm_deploy.interface.batch import parse_batch_line

    assert parse_batch_line('{"prompt": "a", "system": "s", "max_new_tokens": 3, "id": 1}', 1).max_new_tokens == 3
    assert parse_batch_line('{"messages": [{"role": "user", "content": "x"}]}', 1).messages[0].content == "x"
