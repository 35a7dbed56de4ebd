"""`mllm-deploy chat` from a pipe: turns keep the conversation and its KV cache."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from mllm_deploy.model import load_tokenizer, read_spec

STATS = re.compile(r"\[prompt (\d+) tokens \((\d+) reused, (\d+) prefilled\) \| generated (\d+) \((\w+)\)")


def chat(stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mllm_deploy", "chat", "--set", "device.npu_backend=none"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_two_turns_from_a_pipe_prefill_only_new_tokens():
    proc = chat(
        "What is the capital of France?\nAnd of Germany?\n/reset\nWhat is the capital of France?\n/quit\nnever read\n"
    )
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.splitlines()
    assert replies[0] == "The capital of France is Paris."
    assert "Berlin" in replies[1]
    assert replies[2] == replies[0] and len(replies) == 3  # after /reset; nothing after /quit
    assert ">" not in proc.stdout  # no prompt when stdin is not a terminal
    turns = [tuple(int(x) if x.isdigit() else x for x in m.groups()) for m in STATS.finditer(proc.stderr)]
    assert len(turns) == 3
    (p1, r1, f1, g1, why1), (p2, r2, f2, _, _), (p3, r3, f3, _, _) = turns
    assert (p1, r1, f1, g1, why1) == (37, 0, 37, 8, "eos")
    assert r2 == p1 + g1 - 1  # all of turn 1 but its final <|im_end|>, sampled and never fed back
    tokenizer = load_tokenizer(read_spec("builtin:smollm2-135m-instruct"))
    added = "<|im_end|>\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n"
    assert f2 == p2 - r2 == len(tokenizer.encode(added)) == 15
    assert "[conversation reset]" in proc.stderr
    assert (p3, r3, f3) == (37, 0, 37)  # /reset forgets the cache too


@pytest.mark.slow
def test_turn_beyond_max_context_is_reported_and_the_repl_goes_on():
    proc = subprocess.run(
        [sys.executable, "-m", "mllm_deploy", "chat", "--set", "device.npu_backend=none",
         "--set", "prefill.max_context=48", "--max-new-tokens", "4"],
        input="Hi\nWhat is the capital of France? Please answer in one short sentence.\n/reset\nHi\n",
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "longer than prefill.max_context = 48" in proc.stderr and "[turn not run" in proc.stderr
    assert len(STATS.findall(proc.stderr)) == 2  # the first and the last turn ran
