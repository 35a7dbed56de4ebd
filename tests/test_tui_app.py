"""The `up` app driven by Pilot over the REAL default model (float engine, npu_backend=none).

The model is loaded once per module and shared (each app gets its own ChatSession and KV cache).
Waits poll the app's state with a generous timeout so a slow shared machine does not hang the suite;
no test asserts a duration.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from textual.widgets import Input
from tui_snapshots import check_golden, masked

from mllm_deploy.events import ChunkDone
from mllm_deploy.interface.deployment import load_deployment
from mllm_deploy.interface.session import load_model
from mllm_deploy.tui.app import DeployApp
from mllm_deploy.tui.capture import screen_text
from mllm_deploy.tui.messages import EngineEvent
from mllm_deploy.tui.widgets.transcript import MessageView

pytestmark = pytest.mark.slow

FLOAT = ["device.npu_backend=none"]
QUESTION = "What is the capital of France?"
_MODELS: dict[str, object] = {}


def shared_model(deployment):
    key = deployment.profile.model.source
    if key not in _MODELS:
        _MODELS[key] = load_model(deployment)
    return _MODELS[key]


def make_app(*overrides: str) -> DeployApp:
    return DeployApp(load_deployment(None, [*FLOAT, *overrides]), model_loader=shared_model)


async def wait_until(pilot, condition, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; screen:\n{screen_text(pilot.app)}")
        await pilot.pause(0.05)


async def ready(pilot) -> None:
    await wait_until(pilot, lambda: pilot.app.session is not None)


async def ask(pilot, text: str) -> None:
    finished = pilot.app.finished_work
    await pilot.press(*text)
    await pilot.press("enter")
    await wait_until(pilot, lambda: pilot.app.finished_work > finished)


def notifications(app) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]


def views(app, role: str) -> list[MessageView]:
    return [v for v in app.transcript.query(MessageView) if v.role == role]


def test_question_streams_answer_into_one_message_and_keeps_context(update_goldens):
    async def scenario():
        app = make_app()
        async with app.run_test(size=(80, 24)) as pilot:
            await ready(pilot)
            await ask(pilot, QUESTION)
            [reply] = views(app, "assistant")
            assert reply.text == "The capital of France is Paris."
            assert len(reply._parts) >= 5  # appended token by token to this one widget
            [metrics] = views(app, "metrics")
            assert metrics.text.startswith("TTFT ") and "(37 new, 0 reused)" in metrics.text
            assert "eos) · context 44/4,096" in metrics.text
            # the metrics line is mounted; wait until the transcript has scrolled it into view
            await wait_until(pilot, lambda: "reused)" in screen_text(app) and "last turn: TTFT " in screen_text(app))
            await pilot.pause()
            screen = screen_text(app)
            assert "Assistant: The capital of France is Paris." in screen
            assert "last turn: TTFT " in screen and " · ctx 44/4,096" in screen
            check_golden("chat_answer_80x24", masked(app), update_goldens)
            # second turn: only the new tokens are prefilled, the rest comes from the KV cache
            await ask(pilot, "And of Germany?")
            assert "Berlin" in views(app, "assistant")[1].text
            second = views(app, "metrics")[1].text
            assert "(44 reused)" in second or (" reused)" in second and "0 reused" not in second)
            assert app.metrics.turns == 2 and app.metrics.reused_tokens >= 40
            # history: Up brings back the previous inputs
            await pilot.press("up")
            assert app.query_one("#prompt").value == "And of Germany?"
            await pilot.press("up")
            assert app.query_one("#prompt").value == QUESTION
            await pilot.press("down", "down")
            assert app.query_one("#prompt").value == ""
            await pilot.press("ctrl+q")
        assert app.return_code == 0

    asyncio.run(scenario())


def test_escape_cancels_a_running_reply():
    async def scenario():
        app = make_app("decode.max_new_tokens=400")
        async with app.run_test(size=(80, 24)) as pilot:
            await ready(pilot)
            await pilot.press(*"Write a very long story about a dragon.")
            await pilot.press("enter")
            await pilot.press("f2")  # the plan view on top while tokens stream underneath
            await wait_until(pilot, lambda: app.tokens_emitted >= 3)
            assert type(app.screen).__name__ == "PlanScreen"
            await pilot.press("escape")  # first Esc closes the plan view
            await wait_until(pilot, lambda: type(app.screen).__name__ != "PlanScreen")
            await pilot.press("escape")  # the next one cancels the reply
            await wait_until(pilot, lambda: app.finished_work == 1)
            [reply] = views(app, "assistant")
            assert reply.text.endswith(" [cancelled]")
            assert "cancelled) · context" in views(app, "metrics")[0].text
            assert app.metrics.cancelled_turns == 1
            assert app.metrics.generated_tokens < 400
            assert app.session.messages[-1]["role"] == "assistant"  # the partial reply stays in the conversation

    asyncio.run(scenario())


def test_set_bad_value_is_a_notification_and_good_value_applies_in_place():
    async def scenario():
        app = make_app()
        async with app.run_test(size=(80, 24), notifications=True) as pilot:
            await ready(pilot)
            model = app.model
            await pilot.press(*"/set decode.temperature=99")
            await pilot.press("enter")
            await pilot.pause()
            [refusal] = notifications(app)
            assert refusal.startswith("/set: ") and "decode.temperature" in refusal and "got 99" in refusal
            await pilot.press(*"/set decode.max_new_tokens=3")
            await pilot.press("enter")
            await pilot.pause()
            assert (
                notifications(app)[-1] == "/set: decode.max_new_tokens = 3: applies from the next turn; nothing rebuilt"
            )
            assert app.model is model and app.session.profile.decode.max_new_tokens == 3
            await ask(pilot, QUESTION)
            assert views(app, "assistant")[0].text == "The capital of"  # 3 tokens
            await pilot.press(*"/load /no/such/file.txt")
            await pilot.press("enter")
            await pilot.pause()
            assert notifications(app)[-1] == "/load: error: cannot load /no/such/file.txt: no such file"
            assert app.is_running

    asyncio.run(scenario())


DOCUMENT_FACT = "The lighthouse keeper of Port Avel is named Mira Holt."


def long_document(paragraphs: int) -> str:
    """Our own text: numbered notes about a made-up town (~40 tokens each), then one fact."""
    lines = []
    for i in range(paragraphs):
        lines.append(
            f"Note {i + 1}: the harbour of Port Avel logged boat number {i + 17} arriving with "
            f"{(i * 7) % 50 + 3} crates of fish, and the market on street {i % 12 + 1} sold them by noon."
        )
    return "\n".join([*lines, DOCUMENT_FACT])


def test_load_document_shows_prefill_progress_keeps_keys_responsive_and_answers(tmp_path):
    document = tmp_path / "port-avel.txt"
    document.write_text(long_document(12), encoding="utf-8")

    handled: list[tuple[str, object]] = []  # what the UI thread dispatched, in order

    def record(message) -> None:
        if isinstance(message, EngineEvent) and isinstance(message.timed.event, ChunkDone):
            handled.append(("chunk", message.timed.event.index))
        elif isinstance(message, Input.Changed):
            handled.append(("input", message.value))

    async def scenario():
        app = make_app("decode.max_new_tokens=16", "prefill.chunk_size=64")
        async with app.run_test(size=(80, 24), message_hook=record) as pilot:
            await ready(pilot)
            await pilot.press(*f"/load {document}")
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.busy == "document")
            await wait_until(pilot, lambda: app.progress.chunks_done >= 1)
            await pilot.pause()
            progress_screen = screen_text(app)
            await pilot.press(*"What is the name")
            assert app.query_one("#prompt").value == "What is the name"
            await wait_until(pilot, lambda: app.finished_work == 1)
            # keys typed during the prefill were handled between its chunks: the UI thread stayed free
            last_chunk = max(i for i, (kind, _) in enumerate(handled) if kind == "chunk")
            assert ("input", "W") in handled[:last_chunk], handled
            assert "prefill chunk " in progress_screen and " tokens · " in progress_screen and "ETA " in progress_screen
            assert app.progress.n_chunks >= 7 and app.progress.chunks_done == app.progress.n_chunks
            assert app.progress.tokens_done >= 500
            assert app.pending_document is not None
            note = views(app, "note")[-1].text
            assert note.startswith("port-avel.txt: ") and "Ask your question about it." in note
            await ask(pilot, " of the lighthouse keeper of Port Avel?")
            answer = views(app, "assistant")[0].text
            assert "Mira Holt" in answer  # only the document says so
            done_line = views(app, "metrics")[0].text
            reused = int(done_line.split(" new, ")[1].split(" reused")[0].replace(",", ""))
            assert reused >= app.progress.tokens_done - 8  # the question did not prefill the document again

    asyncio.run(scenario())


def test_npu_path_lanes_come_from_measured_subgraph_events(shared_npu_cache):
    """The default profile on its NPU path (ort-cpu emulated NPU here); artifacts are built
    into the run's shared cache by the first test that needs them."""
    from conftest import cache_env

    with cache_env(shared_npu_cache):
        deployment = load_deployment(None, ["decode.max_new_tokens=12"])
        assert deployment.resolved.uses_npu and deployment.resolved.backend == "ort-cpu"
        npu_path_lanes_scenario(deployment)


def npu_path_lanes_scenario(deployment) -> None:
    subgraph_events: list = []

    def record(message) -> None:
        from mllm_deploy.tui.messages import SubgraphEvents

        if isinstance(message, SubgraphEvents):
            subgraph_events.extend(message.events)

    async def scenario():
        app = DeployApp(deployment)
        async with app.run_test(size=(100, 30), message_hook=record) as pilot:
            await ready(pilot)
            await ask(pilot, QUESTION)
            assert "Paris" in views(app, "assistant")[0].text
            finished = [e for e in subgraph_events if type(e).__name__ == "SubgraphFinished"]
            assert {e.processor for e in finished} == {"npu", "cpu"}
            npu_busy = sum(e.t_end - e.t_start for e in finished if e.processor == "npu")
            span = max(e.t_end for e in finished) - min(e.t_start for e in finished)
            now = max(e.t_end for e in finished)
            assert app.tracker.busy_fraction("npu", now, span) == pytest.approx(min(1.0, npu_busy / span), rel=1e-6)
            screen = screen_text(app)
            assert f"NPU · {deployment.resolved.backend_label}" in screen
            await pilot.press("ctrl+q")
        assert app.return_code == 0

    asyncio.run(scenario())
