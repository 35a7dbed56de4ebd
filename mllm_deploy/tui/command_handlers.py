"""Slash-command handlers of the app (a mixin of DeployApp; they run on the UI thread)."""

from __future__ import annotations

from pathlib import Path

from mllm_deploy.errors import Diagnostic, UserError
from mllm_deploy.runtime.report import peak_rss_mb
from mllm_deploy.tui.app_state import AppState
from mllm_deploy.tui.commands import SlashCommand, help_text
from mllm_deploy.tui.formatting import document_message, stats_text
from mllm_deploy.tui.reconfigure import reconfigure
from mllm_deploy.tui.screens.plan_screen import PlanScreen
from mllm_deploy.tui.session_adapter import prefill_context, switch_profile
from mllm_deploy.tui.sessions import SavedSession, default_session_name, load_session, save_session, saved_names

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


class CommandHandlers(AppState):
    """`/name ARG` calls `command_name(ARG)`."""

    def run_command(self, command: SlashCommand) -> None:
        handler = getattr(self, f"command_{command.name}")
        try:
            handler(command.argument)
        except UserError as err:
            self.notify_error(err, f"/{command.name}")

    def command_help(self, argument: str) -> None:
        self.note(help_text())

    def command_quit(self, argument: str) -> None:
        self.quit_app()

    def command_plan(self, argument: str) -> None:
        self.push_screen(PlanScreen(self.deployment))

    def command_stats(self, argument: str) -> None:
        load_s = getattr(self.model, "load_seconds", None)
        self.note(
            stats_text(
                self.metrics,
                load_seconds=load_s,
                peak_rss_mb=peak_rss_mb(),
                backend_label=self.deployment.backend,  # what runs here (emulation, simulator ...)
            )
        )

    def command_reset(self, argument: str) -> None:
        if self.busy is not None:
            self.notify("still working (Esc cancels it first)", severity="warning")
            return
        if self.session is not None:
            self.session.reset()
        self.restore_messages = None
        self.pending_document = None
        self.transcript.clear()
        self.note("new conversation: the KV cache is empty")

    def command_load(self, argument: str) -> None:
        path = Path(argument).expanduser()
        if not path.is_file():
            raise _file_error(path, "no such file")
        if path.stat().st_size > MAX_DOCUMENT_BYTES:
            raise _file_error(path, f"larger than {MAX_DOCUMENT_BYTES // 1024**2} MB")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _file_error(path, f"cannot read it as UTF-8 text: {exc}") from None
        if not text.strip():
            raise _file_error(path, "the file is empty")
        if not self.ready_for_work():
            return
        self.loading_document = {"path": path.name, "message": document_message(path.name, text)}
        self.pending_document = None
        self.note(f"loading {path.name} ({len(text):,} characters) into the KV cache… (Esc cancels)")
        session, message = self.session, self.loading_document["message"]
        assert session is not None  # ready_for_work() checked it
        self.start_work("document", lambda cancel: prefill_context(session, message, cancel))

    def command_set(self, argument: str) -> None:
        if self.busy is not None or self.loading_started is not None:
            self.notify("wait for the current work to finish (Esc cancels it)", severity="warning")
            return
        change = reconfigure(self.deployment, argument)
        for warning in change.new_warnings:
            self.notify(warning.render(), title="profile warning", severity="warning", timeout=6)
        self.deployment = change.deployment
        self.apply_titles()
        self.note(f"/set {change.summary}")
        self.notify(change.summary, title="/set")
        if any(k.startswith("ui.") for k in change.changed):
            self.restart_refresh_timer()
        messages = list(self.session.messages) if self.session is not None else list(self.restore_messages or [])
        if change.rebuild == "nothing" and self.session is not None:
            switch_profile(self.session, self.deployment.loaded)
        elif change.rebuild == "cache" and self.session is not None:
            assert self.model is not None  # a session exists only over a loaded model
            self.session = self.session_factory(self.model, self.deployment.loaded)
            self.session.messages = messages
        elif change.rebuild == "model" or self.session is None:
            self.restore_messages = messages
            self.start_loading(f"/set {argument}")

    def command_save(self, argument: str) -> None:
        name = argument or self.session_name or default_session_name()
        messages = list(self.session.messages) if self.session is not None else list(self.restore_messages or [])
        saved = SavedSession(
            name=name,
            profile=self.deployment.profile_arg,
            overrides=list(self.deployment.overrides),
            messages=messages,
            pending_document=self.pending_document,
            opt_in=self.deployment.opt_in,
        )
        json_path, md_path = save_session(saved)
        self.session_name = name
        self.note(f"saved session {name!r}: {md_path} (reopen: /open {name} or `mllm-deploy up --resume {name}`)")
        self.notify(f"saved {md_path.name} and {json_path.name}", title="/save")

    def command_open(self, argument: str) -> None:
        if self.busy is not None:
            self.notify("still working (Esc cancels it first)", severity="warning")
            return
        saved = load_session(argument)
        if self.session is not None:
            self.session.reset()
            self.session.messages = list(saved.messages)
        else:
            self.restore_messages = list(saved.messages)
        self.pending_document = saved.pending_document
        self.session_name = saved.name
        self.transcript.clear()
        self.show_messages(saved.messages)
        note = f"reopened session {saved.name!r}: {len(saved.messages)} message(s); the conversation is prefilled on the next turn"
        if (saved.profile, tuple(saved.overrides)) != (self.deployment.profile_arg, self.deployment.overrides):
            note += f" (it was saved with profile {saved.profile or 'default'} {' '.join(saved.overrides)}; the current profile is kept)"
        self.note(note)

    def command_sessions(self, argument: str) -> None:
        names = saved_names()
        self.note("saved sessions: " + (", ".join(names) if names else "none yet (/save NAME)"))


def _file_error(path: Path, problem: str) -> UserError:
    return UserError([Diagnostic(message=f"cannot load {path}: {problem}")])
