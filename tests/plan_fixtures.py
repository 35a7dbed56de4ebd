"""Pinned inputs for resolver and plan tests: a recorded host probe and profile builders."""

from __future__ import annotations

import json
from pathlib import Path

from mllm_deploy.device.catalog import catalog_entries
from mllm_deploy.device.host import build_host
from mllm_deploy.device.models import Capabilities, HostProbe
from mllm_deploy.profile import load_profile

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).parent.parent


def pinned_host() -> Capabilities:
    """`host` as probed once on the 2-core dev machine, so golden plans do not depend on CI's machine."""
    probe = HostProbe.model_validate(json.loads((GOLDEN / "host_probe.json").read_text()))
    return build_host(catalog_entries()["host"], probe)


def capabilities(target: str) -> Capabilities:
    return pinned_host() if target == "host" else catalog_entries()[target]


def write_profile(tmp_path: Path, text: str | bytes, name: str = "p.toml") -> Path:
    """A profile file in tmp_path: text as UTF-8, or bytes as given (to test bad encodings)."""
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def loaded_from(tmp_path: Path, text: str, overrides=()):
    return load_profile(write_profile(tmp_path, text), overrides)
