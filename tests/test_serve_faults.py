"""`serve` under faults, on a real server process: a client killed mid-stream (its generation stops
and its KV cache is freed), a full queue (503 + Retry-After), the API key, SIGTERM during a stream
(graceful, exit 0). A tiny random model with a 4096-token context, on which greedy decoding of
"The capital" runs to any length (no EOS): a long generation to interrupt, seconds if left alone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
import tiny_models
from serve_helpers import Server, start_server

LONG_PROMPT = "The capital"
LONG_TOKENS = 3000
KEY = "s3cret-test-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def long_gguf(tmp_path_factory):
    cfg = tiny_models.TinyConfig(context=4096)
    return tiny_models.write_tiny_gguf(tmp_path_factory.mktemp("long"), tied=False, cfg=cfg)


def serve_long(long_gguf, *extra: str) -> Server:
    sets = [f"model.source={long_gguf}", "device.npu_backend=none", "decode.temperature=0", "prefill.max_context=4096"]
    return start_server(*[p for s in sets for p in ("--set", s)], "--kv-slots", "1", *extra)


@pytest.fixture(scope="module")
def server(long_gguf, module_private_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLLM_DEPLOY_API_KEY", KEY)  # the key from the environment
        srv = serve_long(long_gguf, "--max-queue", "1")
    yield srv
    assert srv.stop() == 0, "".join(srv.stderr)


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def long_stream_body(max_tokens: int = LONG_TOKENS) -> str:
    return json.dumps({"model": "tiny-llama", "prompt": LONG_PROMPT, "max_tokens": max_tokens, "stream": True})


# A client in its own process: starts a long stream, reads three events, then dies by SIGKILL.
KILLED_CLIENT = """
import http.client, os, signal, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
conn.request("POST", "/v1/completions", sys.argv[2], {"Authorization": "Bearer %s" % sys.argv[3]})
response = conn.getresponse()
assert response.status == 200, response.status
events = 0
for line in response:
    events += line.startswith(b"data: ")
    if events == 3:
        print("streaming", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_api_key_is_required_except_on_health(server):
    assert server.request("GET", "/health")[0] == 200
    status, _, raw = server.request("GET", "/v1/models")
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0)
    assert client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_client_killed_mid_stream_stops_generation_and_frees_kv(server):
    metric = lambda name: server.metric(name, headers=AUTH)
    cancelled, tokens = metric("mllm_deploy_cancelled_requests_total"), metric("mllm_deploy_completion_tokens_total")
    port = server.url.rsplit(":", 1)[1]
    proc = subprocess.run([sys.executable, "-c", KILLED_CLIENT, port, long_stream_body(), KEY],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL and proc.stdout == "streaming\n", proc.stderr
    wait_for(lambda: metric("mllm_deploy_cancelled_requests_total") == cancelled + 1, "the generation to stop")
    generated = metric("mllm_deploy_completion_tokens_total") - tokens
    assert 3 <= generated < LONG_TOKENS  # stopped early: it would have run to 3000 tokens
    assert metric("mllm_deploy_kv_cached_tokens") == 0  # its (only) KV slot was released
    assert metric("mllm_deploy_requests_running") == 0
    client = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0)
    assert client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_full_queue_answers_503_with_retry_after(server):
    client = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120)
    running = client.completions.create(model="tiny-llama", prompt=LONG_PROMPT, max_tokens=LONG_TOKENS, stream=True)
    next(iter(running))  # the long generation is on the engine
    queued: list[str] = []
    waiter = threading.Thread(
        target=lambda: queued.append(
            client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2).choices[0].finish_reason
        )
    )
    waiter.start()
    wait_for(lambda: server.metric("mllm_deploy_queue_depth", headers=AUTH) == 1, "the second request to queue")
    status, headers, raw = server.request("POST", "/v1/completions", json.dumps(
        {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 2}), AUTH)  # fmt: skip
    assert status == 503 and json.loads(raw)["error"]["code"] == "queue_full"
    assert int(headers["retry-after"]) >= 1
    running.close()  # the client goes away: the long generation stops, the queued request runs
    waiter.join(60)
    assert queued and queued[0] in ("stop", "length")


def test_sigterm_during_a_stream_exits_0(long_gguf, module_private_cache):
    srv = serve_long(long_gguf, "--shutdown-timeout", "1")
    client = openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=120)
    stream = client.completions.create(model="tiny-llama", prompt=LONG_PROMPT, max_tokens=LONG_TOKENS, stream=True)
    chunks = iter(stream)
    next(chunks)
    srv.proc.send_signal(signal.SIGTERM)
    received, reasons = 1, []
    for chunk in chunks:  # after --shutdown-timeout the generation is cancelled between tokens
        received += 1
        reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
    assert received < LONG_TOKENS and reasons == ["cancelled"]  # the stream still ended properly
    assert srv.proc.wait(60) == 0
    assert "Traceback" not in "".join(srv.stderr)
