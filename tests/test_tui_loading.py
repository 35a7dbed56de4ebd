"""The `up` app while its model loads, driven by Pilot: the input takes text from the first frame,
a question sent before the model is ready is shown as pending and answered once it is ready, Esc
cancels it; the loading line shows the real build's stage, k of N and ETA (a tiny model's NPU path,
calibrated and compiled for real into the test's own cache)."""

from __future__ import annotations

import asyncio
import threading
import time

from tiny_models import tiny_npu_sets

from mllm_deploy.interface.deployment import load_deployment
from mllm_deploy.interface.session import load_model
from mllm_deploy.tui.app import DeployApp
from mllm_deploy.tui.capture import screen_text
from mllm_deploy.tui.formatting import loading_line
from mllm_deploy.tui.messages import LoadProgress
from mllm_deploy.tui.turn_handlers import PENDING_TEXT
from mllm_deploy.tui.widgets.transcript import MessageView


def _overrides(model) -> list[str]:
    args = tiny_npu_sets(model, "decode.max_new_tokens=4", "decode.temperature=0")
    return args[1::2]  # the KEY=VALUE of each --set


async def _wait_until(pilot, condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting; screen:\n{screen_text(pilot.app)}\n{getattr(pilot.app, '_seen', '')}"
            )
        await pilot.pause(0.05)


def _views(app, role: str) -> list[MessageView]:
    return [v for v in app.transcript.query(MessageView) if v.role == role]


def test_a_question_typed_while_the_model_builds_is_pending_then_answered(private_cache, smallest_gguf):
    deployment = load_deployment(None, _overrides(smallest_gguf))
    gate = threading.Event()  # holds the loader after its real build until the test has looked

    def loader(d):
        model = load_model(d)  # calibrates and compiles the tiny model's graphs: reports progress
        gate.wait(60)
        return model

    seen: list[LoadProgress] = []
    app = DeployApp(deployment, model_loader=loader)

    def record(message) -> None:
        if isinstance(message, LoadProgress):
            seen.append(message)
        app._seen = [(m.stage, m.done, m.total) for m in seen]

    async def scenario():
        async with app.run_test(size=(100, 30), message_hook=record) as pilot:
            assert app.session is None  # the first frame: still loading
            await pilot.press(*"Hello there", "enter")
            assert app.session is None and len(app.queued) == 1
            assert [v.text for v in _views(app, "user")] == ["Hello there"]
            assert PENDING_TEXT in [v.text for v in _views(app, "note")]
            await _wait_until(pilot, lambda: any(m.stage == "building graphs" and m.done == m.total for m in seen))
            await pilot.pause()
            assert app.session is None and app.load_stage is not None
            assert (app.load_stage.name, app.load_stage.done, app.load_stage.total) == ("building graphs", 2, 2)
            assert app.progress_text(time.perf_counter()).endswith("1 question(s) pending")
            gate.set()
            await _wait_until(pilot, lambda: app.finished_work == 1)
            assert not app.queued and PENDING_TEXT not in [v.text for v in _views(app, "note")]
            assert [v.text for v in _views(app, "user")] == ["Hello there"]  # shown once, not twice
            assert len(_views(app, "assistant")) == 1 and _views(app, "metrics")
            await pilot.press("ctrl+q")

    asyncio.run(scenario())
    graphs = [(m.done, m.total) for m in seen if m.stage == "building graphs"]
    assert graphs == [(k, 2) for k in range(3)]  # the tiny model's two layers, in order
    stages = list(dict.fromkeys(m.stage for m in seen))
    assert stages.index("generating calibration text") < stages.index("building graphs")


def test_escape_cancels_a_pending_question(private_cache, smallest_gguf):
    deployment = load_deployment(None, [*_overrides(smallest_gguf), "device.npu_backend=none"])
    gate = threading.Event()

    def loader(d):
        gate.wait(60)
        return load_model(d)

    app = DeployApp(deployment, model_loader=loader)

    async def scenario():
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await pilot.press(*"first", "enter", *"second", "enter")
            assert [q.text for q in app.queued] == ["first", "second"]
            await pilot.press("escape")
            assert app.queued == []
            assert [v.text for v in _views(app, "user")] == ["first  [cancelled (Esc): not sent]",
                                                             "second  [cancelled (Esc): not sent]"]  # fmt: skip
            gate.set()
            await _wait_until(pilot, lambda: app.session is not None)
            await pilot.pause(0.2)
            assert app.busy is None and app.finished_work == 0  # nothing was sent
            await pilot.press(*"third", "enter")  # once ready, a question goes at once
            await _wait_until(pilot, lambda: app.finished_work == 1)
            await pilot.press("ctrl+q")

    asyncio.run(scenario())


def test_the_loading_line_shows_stage_k_of_n_and_its_eta():
    assert loading_line(41.23, "building graphs", 12, 30, 24.0, 12) == (
        "loading model… 41.2 s · building graphs 12/30 · ETA 36.0 s"  # 18 left at 2 s each
    )
    assert loading_line(3.0, "calibration pass 1/3 (inputs)", 0, 8, 0.5, 0) == (
        "loading model… 3.0 s · calibration pass 1/3 (inputs) 0/8 · ETA -"  # no unit done yet: no rate
    )
    assert loading_line(3.0, "", 0, 0, 0.0, 0) == "loading model… 3.0 s"
