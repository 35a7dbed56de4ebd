"""`validate` and `plan` as a user runs them: exit codes, stdout data, stderr diagnostics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from plan_fixtures import REPO

from mllm_deploy.cli import build_parser, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mllm_deploy", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_plan_json_real_process():
    done = _run("plan", "profiles/sd8gen3.toml", "--json", "--prompt-tokens", "256")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["target"] == "sd8gen3" and data["backend"] == "qnn-htp" and data["n_chunks"] == 1
    assert set(data["memory"]) >= {"npu_weight_bytes", "kv_cache_bytes"}
    assert data["estimate"]["prompt_tokens"] == 256
    assert len(data["edges"]) > len(data["subgraphs"]) - 2
    assert "Traceback" not in done.stderr


def test_validate_exit_codes(tmp_path, capsys):
    good = REPO / "profiles" / "default.toml"
    assert main(["validate", str(good)]) == 0
    assert "ok (name 'default')" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[prefill]\nchunk_sise = 128\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:1" in err and "did you mean 'prefill.chunk_size'" in err
    cannot = tmp_path / "cannot.toml"
    cannot.write_text('[placement]\nattention = "npu"\n')
    assert main(["validate", str(cannot)]) == 3
    assert f"{cannot}:2:1: error: placement.attention" in capsys.readouterr().err


def test_unknown_target_and_missing_model_are_invalid(tmp_path, capsys):
    bad = tmp_path / "p.toml"
    bad.write_text('[model]\nsource = "missing.gguf"\n[device]\ntarget = "pixel9"\n')
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "device.target" in err and "pixel9" in err
    assert "model.source" in err and "missing.gguf" in err


def test_plan_dump_dir_and_prompt_tokens(tmp_path, capsys):
    assert main(["plan", "--dump-dir", str(tmp_path / "d"), "--prompt-tokens", "100"]) == 0
    out = capsys.readouterr().out
    # 100 tokens: two tail chunks of 64 (cost 2 x 88 rows) rather than one padded chunk of 256 (280)
    assert "100 tokens = 2 chunk(s): 2 x 64 (28 padding)" in out
    assert "last 100 token(s) in 2 tail chunk(s) of 64 (cost 176 vs 280 rows, 24 a chunk)" in out
    assert len(list((tmp_path / "d").glob("*.json"))) == 4
    assert main(["plan", "--prompt-tokens", "100", "--set", "prefill.tail_chunk_size=0"]) == 0
    assert "100 tokens = 1 chunk(s) of 256 (156 padding in the last)" in capsys.readouterr().out
    assert main(["plan", "--prompt-tokens", "99999"]) == 2
    assert "--prompt-tokens out of range" in capsys.readouterr().err


def test_plan_with_set_override(capsys):
    assert main(["plan", "--set", "device.npu_backend=none", "--prompt-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "npu backend  none (float32 on the CPU)" in out and "static npu graphs" not in out


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"mllm-deploy {command}" in capsys.readouterr().out
