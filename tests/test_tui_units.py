"""The UI's logic without a terminal: commands, /set rebuild rules, sessions, formatting, plan text,
and the rule that only mllm_deploy/tui/ imports textual."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_deploy.errors import ExitCode, UserError
from mllm_deploy.interface.deployment import load_deployment
from mllm_deploy.tui.commands import COMMANDS, KEY_BINDINGS, chat_text, help_text, parse_command
from mllm_deploy.tui.formatting import bar, document_message, lane, sparkline
from mllm_deploy.tui.plan_text import placement_grid, profile_section, summary_section
from mllm_deploy.tui.reconfigure import rebuild_needed, reconfigure
from mllm_deploy.tui.sessions import SavedSession, load_session, save_session, saved_names

FLOAT = ("device.npu_backend=none",)


@pytest.fixture(scope="module")
def deployment():
    return load_deployment(None, FLOAT)


def test_core_modules_do_not_import_textual():
    code = (
        "import sys\n"
        "import mllm_deploy.cli, mllm_deploy.cli.up_cmd\n"
        "from mllm_deploy.cli import build_parser; build_parser()\n"
        "import mllm_deploy.interface.session, mllm_deploy.runtime.telemetry, mllm_deploy.plan, mllm_deploy.resolve\n"
        "import mllm_deploy.tui, mllm_deploy.tui.reconfigure, mllm_deploy.tui.sessions\n"
        "import mllm_deploy.tui.commands, mllm_deploy.tui.formatting, mllm_deploy.tui.plan_text\n"
        "print(sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "line, expected",
    [
        ("hello", None),
        ("//etc/passwd is a path", None),
        ("/help", ("help", "")),
        ("/SET decode.temperature=0.7 ", ("set", "decode.temperature=0.7")),
        ("/load  notes/long doc.txt", ("load", "notes/long doc.txt")),
        ("/save", ("save", "")),
    ],
)
def test_parse_command(line, expected):
    command = parse_command(line)
    assert (command and (command.name, command.argument)) == expected


@pytest.mark.parametrize(
    "line, message, hint",
    [
        ("/sett x=1", "unknown command /sett", "did you mean /set?"),
        ("/zzz", "unknown command /zzz", "type /help for the list"),
        ("/load", "/load needs FILE", "/load FILE: prefill a text file as context, then ask about it"),
    ],
)
def test_parse_command_errors(line, message, hint):
    with pytest.raises(UserError) as info:
        parse_command(line)
    assert info.value.diagnostics[0].message == message
    assert info.value.diagnostics[0].hint == hint


def test_chat_text_and_help():
    assert chat_text("//usr is a folder") == "/usr is a folder"
    text = help_text()
    for command in COMMANDS:
        assert f"/{command.name}" in text
    for key, _ in KEY_BINDINGS:
        assert key in text


@pytest.mark.parametrize(
    "keys, uses_npu, expected",
    [
        (["decode.temperature", "decode.top_k"], False, "nothing"),
        (["ui.refresh_hz", "name", "model.system_prompt"], False, "nothing"),
        (["prefill.chunk_size"], False, "nothing"),
        (["prefill.chunk_size"], True, "model"),
        (["prefill.max_context"], False, "cache"),
        (["decode.seed", "prefill.max_context"], False, "cache"),
        (["prefill.max_context", "model.source"], False, "model"),
        (["quantization.weights"], True, "model"),
        (["decode.kv_cache"], True, "model"),  # the NPU engine is opened with its KV cache storage
        (["decode.kv_cache", "decode.temperature"], False, "nothing"),  # the float baseline is float32 anyway
        (["decode.temperature"], True, "nothing"),
        ([], False, "nothing"),
    ],
)
def test_rebuild_needed(keys, uses_npu, expected):
    assert rebuild_needed(keys, uses_npu=uses_npu) == expected


def test_reconfigure_decode_value_applies_in_place(deployment):
    change = reconfigure(deployment, "decode.max_new_tokens=5")
    assert change.rebuild == "nothing"
    assert change.changed == {"decode.max_new_tokens": (256, 5)}
    assert change.deployment.profile.decode.max_new_tokens == 5
    assert change.deployment.overrides == (*FLOAT, "decode.max_new_tokens=5")
    assert change.summary == "decode.max_new_tokens = 5: applies from the next turn; nothing rebuilt"
    again = reconfigure(change.deployment, "decode.max_new_tokens=5")
    assert again.changed == {} and again.summary.startswith("no change")


def test_reconfigure_max_context_needs_a_new_cache(deployment):
    change = reconfigure(deployment, "prefill.max_context=2048")
    assert change.rebuild == "cache"
    assert "new KV cache" in change.summary


@pytest.mark.parametrize(
    "assignment, code, text",
    [
        ("decode.temperature=99", ExitCode.INVALID, "decode.temperature"),
        ("decode.temprature=0.5", ExitCode.INVALID, "did you mean"),
        ("decode.temperature", ExitCode.INVALID, "expected KEY=VALUE"),
        ("placement.attention=npu", ExitCode.CANNOT_RUN, "attention cannot run on the NPU"),
    ],
)
def test_reconfigure_refusals(deployment, assignment, code, text):
    with pytest.raises(UserError) as info:
        reconfigure(deployment, assignment)
    assert info.value.exit_code == code
    assert text in str(info.value)


def test_session_save_and_reopen(data_dir):
    session = SavedSession(
        name="france",
        profile=None,
        overrides=list(FLOAT),
        messages=[{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}],
    )  # fmt: skip
    json_path, md_path = save_session(session)
    assert json_path == data_dir / "sessions" / "france.json"
    assert json.loads(json_path.read_text())["messages"][1]["content"] == "The capital of France is Paris."
    markdown = md_path.read_text()
    assert "## You\n\nWhat is the capital of France?" in markdown
    assert "## Assistant\n\nThe capital of France is Paris." in markdown
    assert "`--set device.npu_backend=none`" in markdown
    reopened = load_session("france")
    assert reopened.messages == session.messages and reopened.overrides == list(FLOAT)
    assert saved_names() == ["france"]


def test_session_errors(data_dir):
    with pytest.raises(UserError) as info:
        load_session("missing")
    assert "no saved session named 'missing'" in str(info.value)
    with pytest.raises(UserError):
        load_session("../escape")
    (data_dir / "sessions" / "broken.json").write_text("{not json")
    with pytest.raises(UserError) as info:
        load_session("broken")
    assert "cannot read the saved session" in str(info.value)


@pytest.mark.parametrize(
    "fraction, width, expected",
    [(0.0, 4, "    "), (1.0, 4, "████"), (0.5, 4, "██  "), (0.0625, 2, "▏ "), (2.0, 2, "██")],
)
def test_bar(fraction, width, expected):
    assert bar(fraction, width) == expected


def test_sparkline_and_lane():
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert lane([0.0, 0.01, 0.5, 1.0]) == " ░▒█"


def test_document_message_puts_the_question_after_the_text():
    assert document_message("notes.txt", "  Line one.\n") == "Here is a document (notes.txt):\n\nLine one.\n\n"


def test_plan_text(deployment):
    grid = placement_grid(deployment)
    lines = grid.splitlines()
    assert lines[1].split() == ["layer", "a_norm", "qkv", "attn", "o_proj", "f_norm", "gate_up", "down", "shadow"]
    assert lines[2] == "pre   embed@CPU"
    assert lines[3].split() == ["L0", "CPU", "CPU", "CPU", "CPU", "CPU", "CPU", "CPU", "-"]
    assert sum(line.startswith("L") for line in lines[2:]) == 30
    summary = summary_section(deployment)
    assert "  overrides   device.npu_backend=none" in summary
    assert "  target      host; NPU: none (float32 on the CPU)" in summary
    assert "  memory      NPU 0.0 MiB · CPU " in summary
    assert "  KV cache    180.0 MiB float32 for 4,096 tokens (in the CPU figure)" in summary
    assert "  outliers    shadow; shadowed layers: none" in summary
    section = profile_section(deployment)
    assert " * device.npu_backend = 'none'" in section
    assert " * decode.temperature = 0.0" in section  # written in the default profile file
    assert "   decode.top_k = 0" in section


def _up(*args: str, env_data) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "MLLM_DEPLOY_DATA": str(env_data)}
    return subprocess.run(
        [sys.executable, "-m", "mllm_deploy", "up", *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "args, code, text",
    [
        (("--set", "decode.temperature=99"), 2, "--set decode.temperature=99: error: decode.temperature:"),
        (("--set", "placement.attention=npu"), 3, "attention cannot run on the NPU"),
        (("--resume", "never-saved"), 2, "no saved session named 'never-saved'"),
        (("--set", "device.npu_backend=none"), 2, "`mllm-deploy up` needs a terminal"),
    ],
)
def test_up_refuses_before_the_ui_opens(args, code, text, data_dir):
    result = _up(*args, env_data=data_dir)
    assert result.returncode == code, result.stderr
    assert text in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_up_resume_uses_the_saved_profile_overrides(data_dir):
    save_session(SavedSession(name="was-float", profile=None, overrides=["placement.attention=npu"], messages=[]))
    result = _up("--resume", "was-float", env_data=data_dir)
    assert result.returncode == 3 and "--set placement.attention=npu" in result.stderr


@pytest.mark.parametrize(("opt_in", "code", "text"), [(None, 3, "--emulate"), ("emulate", 2, "needs a terminal")])
def test_up_resume_keeps_the_saved_opt_in(opt_in, code, text, data_dir):
    """A Hexagon profile saved from `up --emulate` reopens emulated (here past every check, to the
    terminal test); saved without the opt-in it is refused on this machine, naming the opt-ins."""
    profile = str(Path(__file__).resolve().parents[1] / "profiles" / "sd8gen3.toml")
    save_session(SavedSession(name="phone", profile=profile, overrides=[], messages=[], opt_in=opt_in))
    result = _up("--resume", "phone", env_data=data_dir)
    assert result.returncode == code, result.stderr
    assert text in result.stderr and "Traceback" not in result.stderr


def test_a_saved_session_with_an_unknown_opt_in_is_refused(data_dir):
    save_session(SavedSession(name="odd", profile=None, overrides=[], messages=[], opt_in="npu"))  # type: ignore[arg-type]
    result = _up("--resume", "odd", env_data=data_dir)
    assert result.returncode == 2 and "opt_in 'npu'" in result.stderr
