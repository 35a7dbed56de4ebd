"""Goldens never write themselves: a missing one fails with how to write it; only
`pytest --update-goldens` (the `update_goldens` fixture) writes one."""

from __future__ import annotations

import pytest
from goldens import golden_bytes, golden_text
from tui_snapshots import check_golden


def test_a_missing_golden_fails_names_the_command_and_writes_nothing(tmp_path):
    path = tmp_path / "absent.txt"
    with pytest.raises(pytest.fail.Exception) as failed:
        golden_text(path, "new output", update=False)
    message = str(failed.value)
    assert "absent.txt is missing" in message
    assert "tests/test_goldens.py::test_a_missing_golden_fails_names_the_command_and_writes_nothing" in message
    assert message.endswith("--update-goldens`, review it and commit it")
    assert not path.exists()
    with pytest.raises(pytest.fail.Exception, match="--update-goldens"):
        golden_bytes(tmp_path / "absent.json.gz", b"\x1f\x8b", update=False)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_tui_snapshot_fails_and_writes_nothing(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"help_80x24\.txt is missing"):
        check_golden("help_80x24", "Commands: /help\n", update=False, golden_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_different_golden_fails_and_is_kept(tmp_path):
    path = tmp_path / "plan.txt"
    path.write_text("old plan\n", encoding="utf-8")
    assert golden_text(path, "new plan\n", update=False) == "old plan\n"  # the caller's assert then fails
    assert path.read_text(encoding="utf-8") == "old plan\n"
    (tmp_path / "tui.txt").write_text("RSS 12 MB\n", encoding="utf-8")
    with pytest.raises(AssertionError, match=r"tui screen changed; .*--update-goldens"):
        check_golden("tui", "RSS 12 GB\n", update=False, golden_dir=tmp_path)


def test_update_writes_a_golden_and_leaves_an_equivalent_one_alone(tmp_path):
    path = tmp_path / "sub" / "plan.txt"
    assert golden_text(path, "plan\n", update=True) == "plan\n"
    assert path.read_text(encoding="utf-8") == "plan\n"
    snapshot = tmp_path / "screen.txt"
    snapshot.write_text("RSS # MB\n", encoding="utf-8")
    check_golden("screen", "RSS  #  M\n", update=True, golden_dir=tmp_path)  # equal once masked
    assert snapshot.read_text(encoding="utf-8") == "RSS # MB\n"
    check_golden("screen", "RSS # GB\n", update=True, golden_dir=tmp_path)
    assert snapshot.read_text(encoding="utf-8") == "RSS # GB\n"
