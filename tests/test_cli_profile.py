"""`mllm-deploy validate`, `schema` and `init`, run in-process through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllm_deploy.cli import main
from mllm_deploy.paths import resource_dir
from mllm_deploy.profile import load_profile
from mllm_deploy.profile.reference import SCHEMA_PATH, build_schema


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_ok(capsys):
    path = str(resource_dir("profiles") / "sd8gen3.toml")
    code, out, err = run(capsys, "validate", path)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"{path}: ok (name 'sd8gen3')"


def test_validate_invalid_profile_reports_every_error_on_stderr(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[device]\nnpu_backend = "qnn"\n[prefill]\nchunk_sz = 1\n', encoding="utf-8")
    code, out, err = run(capsys, "validate", str(path), "--set", "decode.seed=-1")
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith(f"{path}:2:1: error: device.npu_backend: not an allowed value (got 'qnn'")
    assert lines[1] == "    hint: did you mean 'qnn-htp'?"
    assert lines[2].startswith(f"{path}:4:1: error: prefill.chunk_sz: unknown key")
    assert lines[3] == "    hint: did you mean 'prefill.chunk_size'?"
    assert lines[4].startswith("--set decode.seed=-1: error: decode.seed: out of range: must be >= 0")
    assert "Traceback" not in err


def test_validate_prints_warnings_and_still_succeeds(tmp_path, capsys):
    path = tmp_path / "p.toml"
    path.write_text("[decode]\ntop_k = 40\n", encoding="utf-8")
    code, out, err = run(capsys, "validate", str(path))
    assert code == 0
    assert out.splitlines()[0] == f"{path}: ok (name 'default'); 1 warning"
    assert f"{path}:2:1: warning: decode.top_k: has no effect with decode.temperature = 0 (greedy decoding)\n" in err


def test_validate_missing_file(tmp_path, capsys):
    code, _out, err = run(capsys, "validate", str(tmp_path / "missing.toml"))
    assert code == 2
    assert err.startswith(f"{tmp_path / 'missing.toml'}: error: no such profile file")


def test_schema_prints_the_json_schema(capsys):
    code, out, err = run(capsys, "schema")
    assert code == 0 and err == ""
    assert json.loads(out) == build_schema()


def test_init_writes_a_valid_profile_with_a_schema_header(tmp_path, capsys):
    target = tmp_path / "sub" / "mine.toml"
    code, out, err = run(capsys, "init", str(target))
    assert code == 0, err
    assert out.startswith(f"wrote {target} from template 'default'")
    text = target.read_text(encoding="utf-8")
    first_line = text.splitlines()[0]
    assert first_line == f"#:schema {SCHEMA_PATH.resolve().as_uri()}"
    assert Path(SCHEMA_PATH).is_file()
    loaded = load_profile(target)
    assert loaded.profile.model.source == "builtin:smollm2-135m-instruct"
    assert loaded.warnings == []


@pytest.mark.parametrize("template", ["default", "float-baseline", "long-context", "snapdragon"])
def test_init_every_template_validates(tmp_path, capsys, template):
    target = tmp_path / f"{template}.toml"
    code, _, err = run(capsys, "init", str(target), "--template", template)
    assert code == 0, err
    assert text_has_one_schema_line(target.read_text(encoding="utf-8"))
    code, out, _ = run(capsys, "validate", str(target))
    assert code == 0 and "ok" in out


def text_has_one_schema_line(text: str) -> bool:
    return sum(line.startswith("#:schema ") for line in text.splitlines()) == 1 and text.startswith("#:schema ")


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    target = tmp_path / "mine.toml"
    target.write_text("keep me\n", encoding="utf-8")
    code, out, err = run(capsys, "init", str(target))
    assert code == 2 and out == ""
    assert err == f"{target}: error: already exists; not overwriting it\n    hint: pass --force to overwrite it\n"
    assert target.read_text(encoding="utf-8") == "keep me\n"
    code, _, _ = run(capsys, "init", str(target), "--force", "--template", "snapdragon")
    assert code == 0
    assert load_profile(target).profile.device.target == "sd8gen3"


def test_init_unknown_template_suggests_and_lists(tmp_path, capsys):
    code, _, err = run(capsys, "init", str(tmp_path / "x.toml"), "--template", "snapdragn")
    assert code == 2
    assert "unknown template 'snapdragn'" in err
    assert "allowed: default, float-baseline, long-context, snapdragon" in err
    assert "did you mean 'snapdragon'?" in err
    assert not (tmp_path / "x.toml").exists()


def test_init_into_a_directory_is_refused(tmp_path, capsys):
    code, _, err = run(capsys, "init", str(tmp_path), "--force")
    assert code == 2 and "is a directory" in err


def test_init_help_lists_the_templates(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # argparse wraps help at the terminal width
    with pytest.raises(SystemExit) as caught:
        main(["init", "--help"])
    assert caught.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "default, float-baseline, long-context, snapdragon" in out
