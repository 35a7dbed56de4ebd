"""The `up` app's screens without running the model: failures as notifications, the plan view,
help, the command palette, saved sessions, and text snapshots (volatile numbers masked).

Goldens live in tests/__snapshots__/tui/; a missing one fails; write them with
`pytest --update-goldens` (tests/tui_snapshots.py).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from tui_snapshots import check_golden, masked

from mllm_deploy.errors import Diagnostic, UserError
from mllm_deploy.interface.deployment import load_deployment
from mllm_deploy.tui.app import DeployApp
from mllm_deploy.tui.capture import screen_text
from mllm_deploy.tui.screens.plan_screen import PlanScreen
from mllm_deploy.tui.sessions import SavedSession, load_session
from mllm_deploy.tui.widgets.transcript import MessageView

FLOAT = ["device.npu_backend=none"]


class HeldLoader:
    """A model loader that never finishes loading until released (the app stays in its loading state)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, loaded_profile):
        self.release.wait(60)
        raise UserError([Diagnostic(message="test loader released")])


@pytest.fixture(scope="module")
def deployment():
    return load_deployment(None, FLOAT)


pytestmark = pytest.mark.usefixtures("data_dir")  # saved sessions and input history stay in tmp_path


def run(app: DeployApp, scenario, size=(80, 24)):
    async def main():
        try:
            async with app.run_test(size=size, notifications=True) as pilot:
                await pilot.pause()
                await scenario(pilot)
        finally:
            if isinstance(app.model_loader, HeldLoader):
                app.model_loader.release.set()

    asyncio.run(main())


async def wait_until(pilot, condition, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out; screen:\n{screen_text(pilot.app)}")


def on_plan_screen(app) -> bool:
    return isinstance(app.screen, PlanScreen) and bool(app.screen.query("#plan-text"))


def notifications(app) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]


def texts(app, role: str) -> list[str]:
    return [v.text for v in app.transcript.query(MessageView) if v.role == role]


def test_model_failure_is_a_notification_not_a_crash(deployment, update_goldens):
    def broken_loader(loaded_profile):
        raise RuntimeError("weights are corrupt")

    app = DeployApp(deployment, model_loader=broken_loader)

    async def scenario(pilot):
        while not texts(app, "error"):
            await pilot.pause(0.05)
        assert texts(app, "error") == ["the model failed to load: RuntimeError: weights are corrupt"]
        await pilot.press(*"hello", "enter")
        await pilot.pause()
        assert notifications(app) == [
            "Model failed: the model failed to load: RuntimeError: weights are corrupt",
            ": no model is loaded (see the error above; /set can fix the profile)",
        ]
        await pilot.press(*"/frobnicate", "enter")
        await pilot.pause()
        assert (
            notifications(app)[-1]
            == "Unknown command: error: unknown command /frobnicate\n    hint: type /help for the list"
        )
        assert app.is_running
        check_golden("model_failed_80x24", masked(app), update_goldens)

    run(app, scenario)


def test_loading_state_and_plan_view(deployment, update_goldens):
    app = DeployApp(deployment, model_loader=HeldLoader())

    async def scenario(pilot):
        await wait_until(pilot, lambda: "loading model… " in screen_text(app))
        screen = screen_text(app)
        assert "loading builtin:smollm2-135m-instruct (weights, tokenizer, chat template)…" in screen
        assert "loading model… " in screen
        assert "NPU idle · none (float32 on the CPU): no NPU executor" in screen
        check_golden("loading_80x24", masked(app), update_goldens)
        await pilot.press("f2")
        await wait_until(pilot, lambda: on_plan_screen(app))
        await pilot.pause()
        plan = screen_text(app)
        await pilot.pause(3 / deployment.profile.ui.refresh_hz)  # telemetry redraws while another screen is on top
        assert app.is_running
        assert "overrides   device.npu_backend=none" in plan
        assert "L0    CPU     CPU     CPU" in plan
        check_golden("plan_80x24", masked(app), update_goldens)
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, PlanScreen))

    run(app, scenario)


def test_plan_view_lists_layers_and_memory(deployment):
    app = DeployApp(deployment, model_loader=HeldLoader())

    async def scenario(pilot):
        await pilot.press("f2")
        await wait_until(pilot, lambda: on_plan_screen(app))
        grid = str(app.screen.query_one("#plan-grid").render())
        assert "layer a_norm  qkv     attn    o_proj  f_norm  gate_up down    shadow" in grid
        assert "L29   CPU     CPU     CPU     CPU     CPU     CPU     CPU     -" in grid
        plan = str(app.screen.query_one("#plan-text").render())
        assert "memory\n  npu " in plan and "KV cache" in plan

    run(app, scenario, size=(120, 40))


def test_help_and_command_palette(deployment, update_goldens):
    app = DeployApp(deployment, model_loader=HeldLoader())

    async def scenario(pilot):
        await pilot.press("f1")
        await wait_until(pilot, lambda: any(t.startswith("Commands:") for t in texts(app, "note")))
        await pilot.pause()
        [help_text] = [t for t in texts(app, "note") if t.startswith("Commands:")]
        assert "/set KEY=VALUE" in help_text and "Ctrl+Q" in help_text
        check_golden("help_80x24", masked(app), update_goldens)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"plan view")
        await wait_until(pilot, lambda: "Resolved profile and execution plan (F2)" in screen_text(app))
        await pilot.press("enter")
        await wait_until(pilot, lambda: on_plan_screen(app))

    run(app, scenario)


def test_save_and_open_sessions(deployment, data_dir):
    conversation = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    resume = SavedSession(name="trip", profile=None, overrides=FLOAT, messages=conversation)
    app = DeployApp(deployment, model_loader=HeldLoader(), resume=resume)

    async def scenario(pilot):
        assert texts(app, "user") == ["What is the capital of France?"]
        assert texts(app, "assistant") == ["The capital of France is Paris."]
        await pilot.press(*"/save trip-2", "enter")
        await pilot.pause()
        assert notifications(app)[-1] == "/save: saved trip-2.md and trip-2.json"
        assert (data_dir / "sessions" / "trip-2.md").read_text().count("Paris") == 1
        assert load_session("trip-2").messages == conversation
        await pilot.press(*"/reset", "enter")
        await pilot.pause()
        assert texts(app, "assistant") == []
        await pilot.press(*"/open trip-2", "enter")
        await pilot.pause()
        assert texts(app, "assistant") == ["The capital of France is Paris."]
        assert app.restore_messages == conversation  # prefilled once the model is there
        await pilot.press(*"/open nothing-here", "enter")
        await pilot.pause()
        assert (
            notifications(app)[-1].startswith("/open: ")
            and "no saved session named 'nothing-here'" in notifications(app)[-1]
        )

    run(app, scenario)


class StubEngine:
    """The parts of runtime.engine.Engine the app uses outside a turn."""

    def executor_slots(self) -> dict[str, int]:
        return {"cpu": 1}

    def route_subgraph_events(self, sink):
        return lambda: None

    def close(self) -> None:
        pass


class StubModel:
    """Stands in for a LoadedModel where no turn runs."""

    def __init__(self) -> None:
        self.engine = StubEngine()


class StubSession:
    """Stands in for ChatSession where no turn runs: messages, reset, profile updates."""

    def __init__(self, model, loaded_profile) -> None:
        self.model, self.profile, self.messages = model, loaded_profile.profile, []

    def reset(self) -> None:
        self.messages = []

    def update_profile(self, loaded_profile) -> None:
        self.profile = loaded_profile.profile


def test_set_rebuilds_only_what_must_change(deployment):
    loads: list[object] = []

    def counting_loader(loaded_profile):
        loads.append(loaded_profile.overrides)
        return StubModel()

    app = DeployApp(deployment, model_loader=counting_loader, session_factory=StubSession)

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.session is not None)
        app.session.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        first_session = app.session
        await pilot.press(*"/set decode.temperature=0.5", "enter")
        await wait_until(pilot, lambda: "nothing rebuilt" in notifications(app)[-1])
        assert app.session is first_session and app.session.profile.decode.temperature == 0.5
        await pilot.press(*"/set prefill.max_context=2048", "enter")
        await wait_until(pilot, lambda: "new KV cache" in notifications(app)[-1])
        assert app.session is not first_session and app.session.messages == first_session.messages
        assert len(loads) == 1
        await pilot.press(*"/set device.cpu_threads=1", "enter")
        await wait_until(pilot, lambda: len(loads) == 2 and app.session is not None)
        assert (
            notifications(app)[-1]
            == "/set: device.cpu_threads = 1: plan re-resolved, model reloaded; the conversation is prefilled again on the next turn"
        )
        assert loads[-1][-3:] == ("decode.temperature=0.5", "prefill.max_context=2048", "device.cpu_threads=1")
        assert [m["content"] for m in app.session.messages] == ["hi", "hello"]
        assert app.deployment.resolved.cpu_threads == 1

    run(app, scenario)


class FailingSession(StubSession):
    def send(self, text, *, cancel=None):
        raise UserError(
            [
                Diagnostic(
                    message="the prompt is 9,000 tokens, longer than prefill.max_context = 4096",
                    key="prefill.max_context",
                )
            ]
        )
        yield  # a generator, like ChatSession.send


def test_a_failing_turn_is_a_notification(deployment):
    app = DeployApp(deployment, model_loader=lambda loaded: StubModel(), session_factory=FailingSession)

    async def scenario(pilot):
        await wait_until(pilot, lambda: app.session is not None)
        await pilot.press(*"a very long question", "enter")
        await wait_until(pilot, lambda: app.finished_work == 1)
        assert texts(app, "assistant") == [" [failed]"]
        message = "error: prefill.max_context: the prompt is 9,000 tokens, longer than prefill.max_context = 4096"
        assert texts(app, "error") == [message]
        assert notifications(app)[-1] == f"Generation failed: {message}"
        assert app.busy is None and app.is_running

    run(app, scenario)
