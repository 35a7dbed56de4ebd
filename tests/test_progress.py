"""Progress of long steps (cli/progress.py): JSON events on stderr when it is not a terminal, rich
bars on a terminal, nothing with --quiet; a real build reports its stages in order; Ctrl-C during a
build exits 130 and leaves no temporary directory and no half entry in the cache."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
from rich.console import Console
from tiny_models import tiny_npu_sets as sets

from mllm_deploy import cli
from mllm_deploy.cli import build_parser
from mllm_deploy.cli import progress as progress_mod
from mllm_deploy.cli.progress import JsonReporter, QuietReporter, TerminalReporter, reporter_for
from mllm_deploy.events import current_reporter, report_progress, reporting


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"event": "progress"')]


def test_json_events_start_end_and_at_most_one_a_second_between(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress_mod.time, "perf_counter", clock)
    out = io.StringIO()
    reporter = JsonReporter(out)
    for done in range(11):  # 10 units, 0.25 s each
        reporter.progress("building graphs", done, 10)
        clock.now += 0.25
    reporter.note("compiled 40 graphs")
    lines = out.getvalue().splitlines()
    events = [json.loads(line) for line in lines[:-1]]
    assert [(e["done"], e["elapsed_s"], e["eta_s"]) for e in events] == [
        (0, 0.0, None),  # no unit done yet: no rate, no ETA
        (4, 1.0, 1.5),  # 4 units in 1 s: 6 left at 0.25 s each
        (8, 2.0, 0.5),
        (10, 2.5, 0.0),
    ]
    assert all(e["event"] == "progress" and e["stage"] == "building graphs" and e["total"] == 10 for e in events)
    assert lines[-1] == "compiled 40 graphs"


def test_json_events_every_one_with_verbose_and_a_restarted_stage_is_new(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress_mod.time, "perf_counter", clock)
    out = io.StringIO()
    reporter = JsonReporter(out, every_event=True)
    for done in (0, 1, 2, 0, 1):
        reporter.progress("calibration pass 1/3 (inputs)", done, 2)
        clock.now += 1
    events = _events(out.getvalue())
    assert [(e["done"], e["elapsed_s"]) for e in events] == [(0, 0.0), (1, 1.0), (2, 2.0), (0, 0.0), (1, 1.0)]


def test_terminal_bars_show_stage_k_of_n_and_eta():
    stream = io.StringIO()
    reporter = TerminalReporter(Console(file=stream, force_terminal=True, width=120, color_system=None))
    for done in range(4):
        reporter.progress("generating calibration text", done, 3)
    reporter.note("calibrated")
    reporter.close()
    text = stream.getvalue()
    assert "generating calibration text" in text and "3/3" in text and "ETA" in text
    assert text.rstrip().endswith("calibrated")  # the bars stopped when the stage ended; the line follows


@pytest.mark.parametrize(
    ("argv", "tty", "kind"),
    [
        (["validate", "p.toml"], True, TerminalReporter),
        (["validate", "p.toml"], False, JsonReporter),
        (["plan", "p.toml", "--json"], True, JsonReporter),
        (["validate", "-q", "p.toml"], True, QuietReporter),
        (["plan", "-q", "p.toml", "--json"], False, QuietReporter),
    ],
)
def test_the_options_choose_the_reporter(argv, tty, kind):
    stream = _Tty() if tty else io.StringIO()
    assert type(reporter_for(build_parser().parse_args(argv), stream)) is kind


def test_reporting_installs_the_reporter_for_the_block():
    seen = []

    class Recorder(QuietReporter):
        def progress(self, stage, done, total):
            seen.append((stage, done, total))

    assert current_reporter() is None
    report_progress("nobody listens", 0, 1)  # no reporter: nothing happens
    with reporting(Recorder()):
        report_progress("eval: NPU path (chunks)", 1, 2)
    assert current_reporter() is None and seen == [("eval: NPU path (chunks)", 1, 2)]


def test_a_real_build_reports_its_stages_in_order(private_cache, smallest_gguf, tmp_path, capsys):
    out = ["--out", str(tmp_path / "bundle"), "--archive"]
    assert cli.main(["build", "-v", *sets(smallest_gguf, "accuracy.max_ppl_ratio=2"), *out]) == 0
    events = _events(capsys.readouterr().err)
    stages = list(dict.fromkeys(e["stage"] for e in events))
    calibration = [i for i, stage in enumerate(stages) if "calibration" in stage]
    assert calibration and calibration[0] == 0 and stages.index("building graphs") > calibration[-1]
    assert stages[-3:] == [
        "accuracy gate: float32 (chunks)",
        "accuracy gate: the bundle's path (chunks)",
        "writing the bundle (decode graphs, files, archive)",
    ]
    for stage in stages:  # each stage moves from its start to its total without going back (-v: every event)
        dones = [e["done"] for e in events if e["stage"] == stage]
        total = next(e["total"] for e in events if e["stage"] == stage)
        assert dones == sorted(dones) and dones[-1] == total and len(dones) >= min(total, 2), (stage, dones)
    graphs = [(e["done"], e["total"]) for e in events if e["stage"] == "building graphs"]
    assert graphs == [(0, 2), (1, 2), (2, 2)]  # the tiny model's two layers, one at a time


def test_quiet_build_prints_no_progress_and_no_notes(private_cache, smallest_gguf, capsys):
    assert cli.main(["build", "-q", *sets(smallest_gguf)]) == 0
    err = capsys.readouterr().err
    assert err == ""


@pytest.mark.slow  # ~5 s: a build of the tiny model in a subprocess, interrupted once its build directory exists
def test_ctrl_c_during_a_build_exits_130_and_leaves_nothing_half_written(tmp_path):
    model_sets = sets(_tiny_model(tmp_path))
    cache = tmp_path / "cache"
    env = {**os.environ, "MLLM_DEPLOY_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "mllm_deploy", "build", "-v", *model_sets],
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith('{"event": "progress"') and json.loads(line)["stage"] == "building graphs":
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(seen) + rest
    assert rest.rstrip().endswith("interrupted") and "Traceback" not in rest
    artifacts = cache / "artifacts"
    left = sorted(p.name for p in artifacts.rglob("*")) if artifacts.exists() else []
    assert not [n for n in left if n.startswith(".") or n.endswith(".tmp")], left
    assert not [p for p in artifacts.iterdir() if p.is_dir()] if artifacts.exists() else True  # no entry at all


def _tiny_model(tmp_path: Path) -> Path:
    return tiny_models.write_tiny_gguf(tmp_path, tied=True, cfg=tiny_models.SMALLEST)
