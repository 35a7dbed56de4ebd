"""`serve`'s parts in this process: the fair queue's order, the request schemas, /health while the
engine loads (with its progress), and the command's refusals before anything listens."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading

import pytest

from mllm_deploy.events import report_progress
from mllm_deploy.interface.deployment import load_deployment
from mllm_deploy.interface.session import load_model
from mllm_deploy.serve.app import ServeSettings, ServeState, _health
from mllm_deploy.serve.queue import FairQueue, QueueClosed, QueueFull
from mllm_deploy.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest, decode_body, parse_request


@pytest.mark.parametrize(
    "arrivals, order",
    [
        ([("a", 1), ("a", 2), ("a", 3), ("b", 4), ("c", 5)], [1, 4, 5, 2, 3]),  # a flood from a does not starve b, c
        ([("a", 1), ("b", 2), ("a", 3), ("b", 4)], [1, 2, 3, 4]),
        ([("x", 1)], [1]),
    ],
)
def test_fair_queue_takes_users_in_turn(arrivals, order):
    queue: FairQueue[int] = FairQueue(limit=10)
    for user, item in arrivals:
        queue.put(user, item)
    assert [queue.get(timeout=0) for _ in order] == order and len(queue) == 0


def test_fair_queue_limit_remove_and_close():
    queue: FairQueue[int] = FairQueue(limit=2)
    queue.put("a", 1)
    queue.put("b", 2)
    with pytest.raises(QueueFull):
        queue.put("c", 3)
    assert queue.remove_if(lambda item: item == 1) == [1] and len(queue) == 1
    assert queue.close() == [2] and queue.get(timeout=0) is None
    with pytest.raises(QueueClosed):
        queue.put("a", 4)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"model": "m"}, "messages", "missing required argument: messages"),
        ({"model": "m", "messages": []}, "messages", "at least 1"),
        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "'system'"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0.type",
            "'text'",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p", "greater than 0"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", "boolean"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []}, "tools", "unrecognized"),
    ],
)
def test_chat_schema_refusals_name_the_field(body, param, words):
    with pytest.raises(ApiError) as exc:
        parse_request(ChatCompletionRequest, body)
    assert exc.value.status == 400 and exc.value.param == param and words in exc.value.message


def test_schema_accepts_what_the_openai_client_sends():
    chat = parse_request(ChatCompletionRequest, {
        "model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}]},
                                   {"role": "user", "content": "Hi"}],
        "max_completion_tokens": 5, "stop": "\n", "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
    })  # fmt: skip
    assert chat.messages[0].as_template_message() == {"role": "system", "content": "Be brief"}
    assert (chat.token_limit(), chat.stop_strings()) == (5, ("\n",))
    completion = parse_request(CompletionRequest, {"model": "m", "prompt": ["one"], "max_tokens": 3, "seed": 1})
    assert completion.prompt_text() == "one"
    with pytest.raises(ApiError, match="takes one"):
        parse_request(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).prompt_text()


def test_decode_body_refuses_what_is_not_a_json_object():
    assert decode_body(b'{"a": "\xc3\xa9"}') == {"a": "é"}
    for raw, words in [(b"\xc3", "UTF-8"), (b"{", "malformed JSON"), (b"null", "JSON object"), (b" ", "empty")]:
        with pytest.raises(ApiError, match=words):
            decode_body(raw)


def test_health_says_loading_with_progress_until_the_engine_is_ready(tiny_gguf, module_private_cache):
    sets = [f"model.source={tiny_gguf}", "device.npu_backend=none", "prefill.max_context=256"]
    deployment = load_deployment(None, sets, to_run=True)
    state = ServeState(deployment, ServeSettings())
    release = threading.Event()

    def loader(d):
        report_progress("reading weights", 1, 3)
        release.wait(30)
        return load_model(d)

    loading = threading.Thread(target=state.load, args=(loader,))
    loading.start()
    try:
        for _ in range(200):
            if state.progress.stage is not None:
                break
            threading.Event().wait(0.01)
        response = asyncio.run(_health(state, None))
        body = json.loads(response.body)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert body["status"] == "loading" and body["progress"] == {"stage": "reading weights", "done": 1, "total": 3}
    finally:
        release.set()
        loading.join(60)
    ready = asyncio.run(_health(state, None))
    assert ready.status_code == 200 and json.loads(ready.body)["status"] == "ok"
    assert state.worker is not None and state.worker.stop(10)


def mllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mllm_deploy", *args], capture_output=True, text=True, timeout=120)


def test_serve_refuses_a_port_in_use_and_bad_options(tiny_gguf):
    sets = [
        "--set",
        f"model.source={tiny_gguf}",
        "--set",
        "device.npu_backend=none",
        "--set",
        "prefill.max_context=256",
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = mllm("serve", *sets, "--port", str(port))
    assert proc.returncode == 3 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = mllm("serve", *sets, "--max-queue", "0")
    assert proc.returncode == 2 and "--max-queue must be at least 1" in proc.stderr
    proc = mllm("serve", *sets, "--set", "decode.temprature=0")
    assert proc.returncode == 2 and "temperature" in proc.stderr  # the profile's own located error
