"""The docs that are generated stay true: docs/performance.md is the rendering of docs/bench/history.toml,
and every measurement in the data file says what produced it."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "render_performance.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("render_performance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_performance = _load_script()


@pytest.fixture(scope="module")
def history() -> dict:
    return render_performance.load_history(render_performance.HISTORY_PATH)


def test_committed_performance_page_is_the_rendering_of_the_data(history):
    page = render_performance.PERFORMANCE_PATH
    assert page.is_file(), f"{page} is missing; run `{render_performance.RENDER_COMMAND}`"
    assert page.read_text(encoding="utf-8") == render_performance.render(history), (
        f"{page} is stale: docs/bench/history.toml changed; run `{render_performance.RENDER_COMMAND}` and commit"
    )


def test_check_mode_exits_1_on_a_stale_page_and_0_on_a_current_one(tmp_path, capsys):
    out = tmp_path / "performance.md"
    out.write_text("# stale\n", encoding="utf-8")
    assert render_performance.main(["--check", "--out", str(out)]) == 1
    assert "is stale" in capsys.readouterr().err
    assert render_performance.main(["--out", str(out)]) == 0  # writes it
    assert out.read_text(encoding="utf-8") == render_performance.PERFORMANCE_PATH.read_text(encoding="utf-8")
    assert render_performance.main(["--check", "--out", str(out)]) == 0
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_the_committed_data_is_valid(history):
    assert render_performance.validate(history) == []


def test_every_row_names_its_command_configuration_threads_and_prefill(history):
    sessions = history["session"]
    assert len(sessions) >= 5
    for session in sessions:
        assert session["date"] and session["machine"] and session["notes"].strip()
        assert all(c.startswith("mllm-deploy bench ") for c in session["commands"])
        for row in session["rows"]:
            for key in render_performance.ROW_REQUIRED:
                assert key in row, f"{session['date']} {session['title']}: a row has no {key}: {row}"
            assert 1 <= row["command"] <= len(session["commands"])


def test_each_session_renders_its_commands_and_table_newest_first(history):
    page = render_performance.render(history)
    headings = [line for line in page.splitlines() if line.startswith("## 20")]
    dates = [h[3:13] for h in headings]
    assert dates == sorted(dates, reverse=True) and len(headings) == len(history["session"])
    assert headings[-1].startswith("## 2026-11-25")
    for session in history["session"]:
        for command in session["commands"]:
            assert command in page
    # figures appear as written in the data: thousands separators, no re-rounding
    assert "| 2,644 | 75.0 | 513 |" in page
    assert "**654 (624–695)**" in page


def _first_row(data: dict) -> dict:
    return data["session"][0]["rows"][0]


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda d: _first_row(d).pop("command"), "row 1: missing command"),
        (lambda d: _first_row(d).pop("threads"), "row 1: missing threads"),
        (lambda d: _first_row(d).pop("prefill_tok_s"), "row 1: missing prefill_tok_s"),
        (lambda d: _first_row(d).update(command=9), "command must be a number from 1 to"),
        (lambda d: _first_row(d).update(decode_tok_s="fast"), "decode_tok_s: expected a number"),
        (lambda d: _first_row(d).update(ttft_ms={"min": 3, "max": 2}), "min is above its max"),
        (lambda d: _first_row(d).update(tok_s=1), "unknown key tok_s"),
        (lambda d: d["session"][0].update(commands=["bench --repeat 3"]), "exact `mllm-deploy ...` command"),
        (lambda d: d["session"][0].pop("machine"), "missing or empty machine"),
        (lambda d: d["session"][1].update(date=d["session"][0]["date"], order=d["session"][0]["order"]), "same date"),
    ],
)
def test_a_broken_row_or_session_is_refused_by_name(history, break_it, expected):
    data = copy.deepcopy(history)
    break_it(data)
    problems = render_performance.validate(data)
    assert any(expected in p for p in problems), problems
    with pytest.raises(render_performance.HistoryError):
        render_performance.render(data)


def test_an_invalid_data_file_fails_the_script_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "history.toml"
    bad.write_text('schema_version = 1\nintro = "x"\n[[session]]\ndate = "2026-01-01"\n', encoding="utf-8")
    assert render_performance.main(["--check", "--history", str(bad), "--out", str(tmp_path / "p.md")]) == 2
    assert "missing or empty machine" in capsys.readouterr().err
