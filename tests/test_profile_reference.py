"""Generated schema and reference are current; shipped profiles and templates are valid."""

from __future__ import annotations

import json

import pytest

from mllm_deploy.paths import resource_dir
from mllm_deploy.profile import load_profile
from mllm_deploy.profile.fields import all_keys
from mllm_deploy.profile.reference import (
    REFERENCE_PATH,
    REGENERATE_COMMAND,
    SCHEMA_PATH,
    build_schema,
    reference_text,
    schema_text,
)

CATALOG_IDS = ["host", "sd8gen2", "sd8gen3", "sd8elite", "x-elite", "qcs6490"]
TEMPLATES = ["default", "float-baseline", "long-context", "snapdragon"]


@pytest.mark.parametrize(("path", "generate"), [(SCHEMA_PATH, schema_text), (REFERENCE_PATH, reference_text)])
def test_committed_copy_is_current(path, generate):
    assert path.is_file(), f"{path} is missing; run `{REGENERATE_COMMAND}`"
    assert path.read_text(encoding="utf-8") == generate(), (
        f"{path} is stale: the profile models changed; run `{REGENERATE_COMMAND}` and commit the result"
    )


def test_schema_describes_every_key_with_its_limits():
    schema = build_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    defs = schema["$defs"]
    prefill = defs["PrefillSection"]["properties"]
    assert prefill["chunk_size"]["minimum"] == 1 and prefill["chunk_size"]["maximum"] == 4096
    assert "static batch dimension" in prefill["chunk_size"]["description"]
    assert defs["DeviceSection"]["properties"]["npu_backend"]["enum"] == ["auto", "qnn-htp", "ort-cpu", "none"]
    # TOML has no null: optional keys are plain integers without a null default
    assert defs["DeviceSection"]["properties"]["cpu_threads"]["type"] == "integer"
    assert "default" not in defs["DeviceSection"]["properties"]["cpu_threads"]
    assert "null" not in json.dumps(schema)


def test_reference_documents_every_key():
    text = reference_text()
    for key, info in all_keys().items():
        if info.is_section:
            assert f"## [{key}]" in text
        else:
            row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
            assert info.allowed in row.replace("\\|", "|")
            assert info.doc.split()[0] in row
    assert "| `prefill.chunk_size` | integer | `256` | an integer from 1 to 4096 |" in text


def test_every_field_is_documented():
    undocumented = [key for key, info in all_keys().items() if not info.doc]
    assert undocumented == []


@pytest.mark.parametrize("device_id", CATALOG_IDS)
def test_example_profile_for_each_catalog_device(device_id):
    loaded = load_profile(resource_dir("profiles") / f"{device_id}.toml")
    assert loaded.profile.device.target == device_id
    assert loaded.profile.name == device_id
    assert loaded.warnings == []
    if device_id != "host":
        assert loaded.profile.device.npu_backend == "qnn-htp"
        assert loaded.profile.prefill.chunk_size % 32 == 0


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_are_valid_without_warnings(name):
    loaded = load_profile(resource_dir("templates") / "profiles" / f"{name}.toml")
    assert loaded.warnings == []


def test_template_specifics():
    folder = resource_dir("templates") / "profiles"
    assert sorted(p.stem for p in folder.glob("*.toml")) == sorted(TEMPLATES)
    assert load_profile(folder / "float-baseline.toml").profile.device.npu_backend == "none"
    snapdragon = load_profile(folder / "snapdragon.toml").profile
    assert (snapdragon.device.target, snapdragon.device.npu_backend) == ("sd8gen3", "qnn-htp")
    assert load_profile(folder / "long-context.toml").profile.prefill.max_context == 8192
