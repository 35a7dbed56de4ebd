"""Device catalog, capability models, target lookup and the `devices` command."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError

from mllm_deploy.cli import main
from mllm_deploy.device import (
    Capabilities,
    CatalogError,
    ChunkSizeRule,
    device_ids,
    list_devices,
    load_capabilities,
    models,
)
from mllm_deploy.device import catalog as catalog_mod
from mllm_deploy.errors import ExitCode, UserError

CATALOG_IDS = ["sd8gen2", "sd8gen3", "sd8elite", "x-elite", "qcs6490"]

pytestmark = pytest.mark.usefixtures("module_private_cache")  # one probe of this machine per module, cached there


def test_catalog_ships_exactly_the_expected_files():
    names = sorted(p.name for p in catalog_mod.catalog_dir().glob("*.toml"))
    assert names == sorted(f"{i}.toml" for i in [*CATALOG_IDS, "host"])


def test_device_ids_host_first():
    ids = device_ids()
    assert ids[0] == "host"
    assert sorted(ids[1:]) == sorted(CATALOG_IDS)


@pytest.mark.parametrize("path", sorted(catalog_mod.catalog_dir().glob("*.toml")), ids=lambda p: p.stem)
def test_every_catalog_file_validates_and_says_nominal(path):
    caps = catalog_mod.load_file(path)
    text = path.read_text()
    assert caps.id == path.stem
    if caps.id == "host":
        assert caps.kind == "host" and caps.nominal is False
        assert "probe" in text.lower()
    else:
        assert caps.nominal is True
        assert "nominal" in caps.source_note.lower()
        assert "NOMINAL" in text.splitlines()[0]  # the header comment says so
        assert caps.backends == ["qnn-htp"] and caps.auto_backend == "qnn-htp"
        assert caps.npu is not None and caps.npu.kind == "hexagon-htp"
        assert caps.npu.int8_tops and caps.memory_bandwidth_gbps and caps.ram_bytes > 0


# (id, htp_arch, soc_model, int8_tops, fp16, cpu cores, kind)
FIGURES = [
    ("sd8gen2", "v73", 43, 23.0, True, 8, "phone"),
    ("sd8gen3", "v75", 57, 45.0, True, 8, "phone"),
    ("sd8elite", "v79", 69, 65.0, True, 8, "phone"),
    ("x-elite", "v73", 60, 45.0, True, 12, "laptop"),
    ("qcs6490", "v68", 35, 12.0, False, 8, "iot"),
]


@pytest.mark.parametrize("device_id,arch,soc,tops,fp16,cores,kind", FIGURES)
def test_catalog_figures(device_id, arch, soc, tops, fp16, cores, kind):
    caps = load_capabilities(device_id)
    assert caps.kind == kind
    assert caps.npu.htp_arch == arch
    assert caps.npu.qnn_soc_model == soc
    assert caps.npu.int8_tops == tops
    assert caps.npu.supports_fp16 is fp16
    assert caps.cpu_cores == cores


def test_npu_memory_about_4gib_on_recent_parts_less_on_qcs6490():
    gib = 1024**3
    for device_id in ("sd8gen2", "sd8gen3", "sd8elite", "x-elite"):
        assert load_capabilities(device_id).npu.addressable_memory_bytes == 4 * gib
    assert load_capabilities("qcs6490").npu.addressable_memory_bytes < 4 * gib


def test_cluster_gflops_match_clock_times_flops_per_cycle():
    for caps in list_devices(include_host=False):
        for cluster in caps.cpu_clusters:
            per_cycle = cluster.gflops_per_core / cluster.ghz
            assert per_cycle == pytest.approx(round(per_cycle)), (caps.id, cluster.name)
            assert round(per_cycle) in (8, 16, 32), (caps.id, cluster.name)


@pytest.mark.parametrize(
    "n,allowed",
    [(32, True), (256, True), (1024, True), (0, False), (16, False), (33, False), (1056, False), (True, False)],
)
def test_chunk_size_rule_on_phones(n, allowed):
    caps = load_capabilities("sd8gen3")
    assert caps.chunk_size_allowed(n) is allowed
    assert caps.chunk_size_rule() == "multiples of 32 from 32 to 1024"


def test_chunk_size_rule_on_host_is_any_size():
    caps = load_capabilities("host")
    assert caps.chunk_size_allowed(1) and caps.chunk_size_allowed(257) and caps.chunk_size_allowed(4096)
    assert not caps.chunk_size_allowed(4097)
    assert caps.chunk_size_rule() == "any size from 1 to 4096"


def test_chunk_rule_rejects_inverted_range():
    with pytest.raises(ValidationError, match="larger than max_tokens"):
        ChunkSizeRule(multiple_of=32, min_tokens=512, max_tokens=256)


@pytest.mark.parametrize("typo,suggestion", [("sd8gne3", "sd8gen3"), ("xelite", "x-elite"), ("qcs649", "qcs6490")])
def test_unknown_target_did_you_mean(typo, suggestion):
    with pytest.raises(UserError) as info:
        load_capabilities(typo)
    err = info.value
    assert err.exit_code == ExitCode.INVALID
    diag = err.diagnostics[0]
    assert diag.key == "device.target" and diag.value == typo
    assert diag.hint == f"did you mean {suggestion!r}?"
    for device_id in ["host", *CATALOG_IDS]:
        assert device_id in diag.allowed


def test_unknown_target_far_off_lists_ids():
    with pytest.raises(UserError) as info:
        load_capabilities("raspberry-pi")
    assert "mllm-deploy devices" in info.value.diagnostics[0].hint


def _all_models() -> list[type[BaseModel]]:
    return [models.Capabilities, models.NpuCaps, models.CpuCluster, models.ChunkSizeRule, models.HostProbe]


@pytest.mark.parametrize("model", _all_models(), ids=lambda m: m.__name__)
def test_every_field_documented_and_model_strict(model):
    assert model.model_config["extra"] == "forbid" and model.model_config["frozen"]
    for name, field in model.model_fields.items():
        assert field.description and len(field.description) > 10, f"{model.__name__}.{name}"


def test_capabilities_reject_extra_keys_and_bad_arch():
    data = load_capabilities("sd8gen3").model_dump()
    with pytest.raises(ValidationError):
        Capabilities.model_validate({**data, "tops": 1})
    bad = json.loads(json.dumps(data))
    bad["npu"]["htp_arch"] = "v70"
    with pytest.raises(ValidationError):
        Capabilities.model_validate(bad)
    caps = Capabilities.model_validate(data)
    with pytest.raises(ValidationError):
        caps.ram_bytes = 1  # frozen


def test_broken_catalog_file_is_a_packaging_error_naming_the_file(tmp_path):
    bad_toml = tmp_path / "sd8gen3.toml"
    bad_toml.write_text("id = 'sd8gen3\n")
    with pytest.raises(CatalogError) as info:
        catalog_mod.load_file(bad_toml)
    assert info.value.exit_code == ExitCode.INTERNAL
    assert info.value.diagnostics[0].file == str(bad_toml)
    assert "invalid TOML" in str(info.value)

    good = (catalog_mod.catalog_dir() / "sd8gen3.toml").read_text()
    bad_value = tmp_path / "sd8gen2.toml"
    bad_value.write_text(good.replace('id = "sd8gen3"', 'id = "sd8gen2"').replace('"v75"', '"v99"'))
    with pytest.raises(CatalogError) as info:
        catalog_mod.load_file(bad_value)
    diag = info.value.diagnostics[0]
    assert diag.file == str(bad_value) and diag.key == "npu.htp_arch" and diag.value == "v99"

    renamed = tmp_path / "other.toml"
    renamed.write_text(good)
    with pytest.raises(CatalogError, match="does not match the file name"):
        catalog_mod.load_file(renamed)


def test_broken_catalog_exits_1_from_cli(tmp_path, monkeypatch, capsys):
    for path in catalog_mod.catalog_dir().glob("*.toml"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "qcs6490.toml").write_text("id = 'qcs6490'\n")
    monkeypatch.setattr(catalog_mod, "catalog_dir", lambda: tmp_path)
    assert main(["devices"]) == 1
    err = capsys.readouterr().err
    assert "qcs6490.toml" in err and "packaging error" in err and "Traceback" not in err


def test_devices_table(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "NPU"]
    rows = {line.split()[0]: line for line in lines[1:7]}
    assert set(rows) == {"host", *CATALOG_IDS}
    assert "HTP v75 soc 57" in rows["sd8gen3"] and "45*" in rows["sd8gen3"]
    assert "HTP v68 soc 35" in rows["qcs6490"] and "yes/yes/no" in rows["qcs6490"]
    assert "16.0 GiB*" in rows["sd8gen3"]  # catalog figures are marked nominal
    assert "nominal" in out
    host = load_capabilities("host")
    assert f"{host.ram_bytes / 1024**3:.1f} GiB " in rows["host"]  # probed RAM, unmarked
    assert "ort-cpu" in rows["host"]
    probe = host.probe
    if probe.qnn_htp_mode == "simulator":
        assert "QNN HTP: x86 simulator (correct, ~200-700x slower than CPU; not used by auto)" in out
    if probe.has_amx_int8 or probe.has_avx512_vnni or probe.has_avx_vnni:
        assert "ort-cpu: INT8 via AMX/VNNI" in out
    assert f"{probe.usable_cpus} usable of {probe.logical_cpus} logical CPUs" in out


def test_devices_json(capsys):
    assert main(["devices", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in data] == device_ids()
    by_id = {d["id"]: Capabilities.model_validate(d) for d in data}
    assert by_id["sd8elite"].npu.htp_arch == "v79"
    assert by_id["host"].probe is not None and by_id["host"].probe.ok
    assert by_id["host"] == load_capabilities("host")


def test_devices_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["devices", "--help"])
    assert info.value.code == 0
    assert "--json" in capsys.readouterr().out
