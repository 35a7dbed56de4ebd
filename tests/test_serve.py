"""`mllm-deploy serve` as users use it: the official openai client against a real server process on
a free loopback port (tiny random model, float engine), a bounded load test, malformed requests
between good ones, shared-prefix reuse. Every answer is checked against the same generation run
in this process through the interface layer (greedy: the same tokens)."""

from __future__ import annotations

import json

import openai
import pytest
from serve_helpers import Server, start_server

from mllm_deploy.interface.deployment import load_deployment
from mllm_deploy.interface.session import ChatSession, load_model
from mllm_deploy.serve.loadgen import run_load, summarize

MAX_CONTEXT = 256
PROMPTS = ["Hello there", "What is the capital of France?", "def forward(self, x):", "the quick brown fox"]


@pytest.fixture(scope="module")
def settings(tiny_gguf) -> list[str]:
    return [f"model.source={tiny_gguf}", "device.npu_backend=none", "decode.temperature=0",
            f"prefill.max_context={MAX_CONTEXT}"]  # fmt: skip


@pytest.fixture(scope="module")
def server(settings, module_private_cache):
    args = [part for s in settings for part in ("--set", s)]
    srv = start_server(*args, "--max-queue", "64")
    yield srv
    assert srv.stop() == 0, "".join(srv.stderr)


@pytest.fixture(scope="module")
def session(settings, module_private_cache) -> ChatSession:
    deployment = load_deployment(None, settings, to_run=True)
    return ChatSession(load_model(deployment), deployment.loaded)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    (model,) = client.models.list().data
    return model.id


def expected_reply(session: ChatSession, prompt: str, max_tokens: int) -> tuple[str, int, int]:
    """(text, prompt tokens, generated tokens) of the same chat run here."""
    session.reset()
    *_, done = session.reply_to([{"role": "user", "content": prompt}], max_new_tokens=max_tokens)
    return done.text, done.prompt_tokens, done.generated_tokens


def test_models_and_health(server, model_id):
    assert model_id == "tiny-llama"
    status, health = server.json("GET", "/health")
    assert (status, health["status"], health["model"], health["backend"]) == (200, "ok", "tiny-llama", "none")


def test_chat_completion_matches_the_interface_layer(client, model_id, session):
    text, prompt_tokens, generated = expected_reply(session, PROMPTS[1], 12)
    reply = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=12
    )
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("length" if generated == 12 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, generated)
    extra = reply.model_extra["x_mllm_deploy"]
    assert extra["backend"] == "none" and extra["engine"]["npu"] == "none"
    assert extra["npu_busy_s"] == 0.0 and extra["cpu_busy_s"] > 0
    assert extra["prefill_tokens_per_s"] > 0 and extra["prefilled_tokens"] + extra["reused_tokens"] == prompt_tokens


def test_streamed_chat_is_the_same_text_and_ends_with_usage(client, model_id, session):
    text, prompt_tokens, generated = expected_reply(session, PROMPTS[0], 10)
    stream = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length" if generated == 10 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == generated
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_sse_wire_format_ends_with_done(server, model_id):
    body = {"model": model_id, "prompt": "Hello", "max_tokens": 3, "stream": True}
    status, headers, raw = server.request("POST", "/v1/completions", json.dumps(body))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_completion_and_stop_sequence(client, model_id, session):
    session.reset()
    *_, done = session.complete("The capital of France", max_new_tokens=16)
    full = client.completions.create(model=model_id, prompt="The capital of France", max_tokens=16)
    assert full.choices[0].text == done.text and full.usage.completion_tokens == done.generated_tokens
    stop = done.text[len(done.text) // 2 : len(done.text) // 2 + 2]
    assert stop.strip(), f"pick another stop string from {done.text!r}"
    cut = client.completions.create(model=model_id, prompt="The capital of France", max_tokens=16, stop=[stop])
    assert cut.choices[0].text == done.text[: done.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client, model_id):
    ask = lambda seed: (
        client.completions.create(model=model_id, prompt="Hello", max_tokens=8, temperature=1.0, top_p=0.9, seed=seed)
        .choices[0]
        .text
    )
    assert ask(7) == ask(7)
    assert len({ask(seed) for seed in range(6)}) > 1  # sampling really samples


def test_shared_system_prompt_reuses_kv(client, model_id):
    system = "You are a terse assistant. " * 8
    ask = lambda user: client.chat.completions.create(
        model=model_id, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        max_tokens=2,
    )  # fmt: skip
    ask("Hello there")
    second = ask("What is the capital of France?")
    reused = second.model_extra["x_mllm_deploy"]["reused_tokens"]
    assert second.usage.prompt_tokens_details.cached_tokens == reused
    assert reused > 40  # at least the shared system prompt (~50 tokens) came from the KV cache
    assert second.model_extra["x_mllm_deploy"]["prefilled_tokens"] == second.usage.prompt_tokens - reused


def test_errors_through_the_client(client, model_id):
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match=f"the context holds {MAX_CONTEXT} tokens") as exc:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=10**6)
    assert exc.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument supplied: logit_bias"):
        client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Hi"}], logit_bias={"1": 5}
        )
    with pytest.raises(openai.BadRequestError, match=r"prefill.max_context = 256") as exc:
        client.completions.create(model=model_id, prompt="word " * 400, max_tokens=2)
    assert exc.value.code == "context_length_exceeded"


# (body, status, words of the message): each is sent between two good requests
MALFORMED = [
    (b'{"model": "tiny-llama", "messages": [', 400, "malformed JSON"),
    (b'{"model": "tiny-llama", "prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"", 400, "body is empty"),
    (b'{"model": "tiny-llama", "prompt": "\\ud800"}', 400, "lone surrogate"),
    (b'{"model": "tiny-llama", "prompt": "Hi", "max_tokens": "8"}', 400, "valid integer"),
    (b'{"model": "tiny-llama", "prompt": "Hi", "max_tokens": -1}', 400, "greater than or equal to 1"),
    (b'{"model": "tiny-llama", "prompt": "Hi", "max_tokens": 1e30}', 400, "max_tokens"),
    (b'{"model": "tiny-llama", "prompt": "Hi", "temperature": "hot"}', 400, "temperature"),
    (b'{"model": "tiny-llama", "prompt": "Hi", "n": 3}', 400, "'n'"),
    (b'{"model": "tiny-llama", "prompt": "Hi", "stop": ["a","b","c","d","e"]}', 400, "at most 4"),
    (b'{"model": "tiny-llama", "prompt": "Hi", "echo": true}', 400, "unrecognized request argument"),
    (b'{"model": "tiny-llama", "prompt": "Hi", "file": "/etc/passwd"}', 400, "unrecognized request argument"),
    (b'{"prompt": "Hi"}', 400, "missing required argument: model"),
    (b'{"model": "tiny-llama", "prompt": ""}', 400, "empty"),
    (b"{" + b'"a":' * 50000 + b"1" + b"}" * 50000, 400, "JSON"),
    (b'{"model": "tiny-llama", "prompt": "' + b"x" * (2 << 20) + b'"}', 413, "limit"),
]


def test_malformed_requests_between_good_ones(server, model_id, client):
    good = lambda: client.completions.create(model=model_id, prompt="Hello", max_tokens=3).choices[0].text
    first = good()
    for body, status, words in MALFORMED:
        got, headers, raw = server.request("POST", "/v1/completions", body)
        error = json.loads(raw)["error"]
        assert (got, words in error["message"]) == (status, True), (body[:60], error)
        assert set(error) == {"message", "type", "param", "code"} and headers["content-type"] == "application/json"
        assert good() == first  # the server goes on serving, unchanged
    status, _, raw = server.request("GET", "/v1/chat/completions")
    assert status == 405 and "not allowed" in json.loads(raw)["error"]["message"]
    status, _, raw = server.request("GET", "/v1/files/etc/passwd")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"


def test_load_32_requests_from_8_clients(server, model_id, session, record_property):
    expected = {p: expected_reply(session, p, 16)[0] for p in PROMPTS}
    before = server.metric("mllm_deploy_completion_tokens_total")
    results, wall = run_load(server.url, model_id, PROMPTS, concurrency=8, requests=32, max_tokens=16)
    assert len(results) == 32 and [r.index for r in results] == list(range(32))  # none lost
    for r in results:
        assert (r.status, r.done) == (200, True)
        assert r.text == expected[PROMPTS[r.index % len(PROMPTS)]]  # correct and complete under concurrency
    summary = summarize(results, wall)
    record_property("serve_load", summary)
    print(f"\nserve load (tiny model, 8 clients): {summary}")
    assert summary["completed"] == 32 and summary["latency_p95_ms"] >= summary["latency_p50_ms"] > 0
    assert server.metric("mllm_deploy_completion_tokens_total") - before == sum(r.completion_tokens for r in results)
    assert server.metric("mllm_deploy_queue_depth") == 0


def test_metrics_are_prometheus_text(server, client, model_id):
    client.completions.create(model=model_id, prompt="Hello", max_tokens=3)  # at least one request ran
    status, headers, raw = server.request("GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("mllm_deploy_requests_total", "mllm_deploy_ttft_seconds_bucket", "mllm_deploy_queue_depth",
                 "mllm_deploy_prefill_tokens_per_second_count", "mllm_deploy_decode_tokens_per_second_count",
                 'mllm_deploy_processor_busy_fraction{processor="cpu"}'):  # fmt: skip
        assert name in text, name
    cpu = next(
        line for line in text.splitlines() if line.startswith('mllm_deploy_processor_busy_fraction{processor="cpu"}')
    )
    assert 0 < float(cpu.split()[1]) <= 1
    assert 'mllm_deploy_requests_total{endpoint="completions",status="400"}' in text
