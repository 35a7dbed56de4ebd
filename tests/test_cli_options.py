"""Options every command shares (-v/--verbose, -q/--quiet) and refusals before a model loads."""

from __future__ import annotations

import argparse
import json

import pytest

from mllm_deploy.cli import build_parser, main
from mllm_deploy.cli.common import verbosity

FLOAT = ["--set", "device.npu_backend=none"]


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _parsers(sub, (*path, name))


def test_every_command_and_action_takes_verbose_and_quiet():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) >= 14  # every command, and `models list|pull`
    for path, parser in parsers:
        options = {s for a in parser._actions for s in a.option_strings}
        assert {"-v", "--verbose", "-q", "--quiet"} <= options, path


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["validate", "p.toml"], 0),
        (["validate", "p.toml", "-v"], 1),
        (["-v", "validate", "p.toml", "-v"], 1),  # the command's own count
        (["validate", "-vv", "p.toml"], 2),
        (["validate", "--quiet", "p.toml"], -1),
        (["-q", "models", "list"], -1),
        (["models", "list", "-q"], -1),
    ],
)
def test_verbosity_levels(argv, level):
    assert verbosity(build_parser().parse_args(argv)) == level


def test_verbose_and_quiet_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["validate", "-v", "-q", "p.toml"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_empty_prompt_is_refused_before_the_model_loads(capsys):
    assert main(["run", *FLOAT, "--prompt", "  \n"]) == 2
    err = capsys.readouterr().err
    assert "error: --prompt: the prompt is empty: give some text to send (got '  \\n')" in err


def test_empty_prompt_file_is_refused_naming_it(tmp_path, capsys):
    empty = tmp_path / "prompt.txt"
    empty.write_text("\n\n", encoding="utf-8")
    assert main(["run", *FLOAT, "--prompt-file", str(empty)]) == 2
    assert f"{empty}: error: the prompt file is empty" in capsys.readouterr().err


def test_blank_batch_prompt_is_an_error_line(tmp_path, capsys):
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"prompt": "   "}) + "\n" + json.dumps({"prompt": ""}) + "\n", encoding="utf-8")
    assert main(["run", *FLOAT, "--batch", str(batch), "--max-new-tokens", "1"]) == 2
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        {"line": 1, "error": "line 1: 'prompt' holds only whitespace: give some text to send"},
        {"line": 2, "error": "line 2: 'prompt' must be a non-empty string"},
    ]
