"""Temporary build directories: a build killed outright (kill -9) leaves its directory behind,
and the next build in the same place removes it; a directory of a live build is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from mllm_deploy.paths import make_build_dir, remove_orphaned_build_dirs


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_the_next_build_removes_what_a_killed_build_left(tmp_path):
    killed = tmp_path / f".entry.pid{dead_pid()}.abcd1234"
    (killed / "graphs").mkdir(parents=True)
    (killed / "graphs" / "layer0_qkv.onnx").write_bytes(b"half a graph")
    running = tmp_path / f".entry.pid{os.getpid()}.efgh5678"  # a build in progress (this process)
    running.mkdir()
    finished = tmp_path / "entry"  # a complete entry and a stranger's dot-directory stay
    finished.mkdir()
    other = tmp_path / ".git"
    other.mkdir()

    new = make_build_dir(tmp_path, "entry")

    assert not killed.exists()
    assert running.is_dir() and finished.is_dir() and other.is_dir() and new.is_dir()
    assert new.name.startswith(f".entry.pid{os.getpid()}.")
    assert remove_orphaned_build_dirs(tmp_path) == []  # nothing else is orphaned


def test_a_build_killed_with_sigkill_leaves_a_directory_the_next_one_removes(tmp_path):
    code = (
        "import sys, time; from mllm_deploy.paths import make_build_dir; "
        "d = make_build_dir(sys.argv[1], 'entry'); (d / 'part').write_text('x'); print(d, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    left = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    assert os.path.isdir(left)
    make_build_dir(tmp_path, "entry")
    assert not os.path.exists(left)
