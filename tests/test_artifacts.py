"""Artifact cache: hit, miss on every relevant change, recovery from corrupt or half-written
entries and mismatching lockfiles, and the bundle round trip."""

from __future__ import annotations

import json

import pytest
from plan_fixtures import pinned_host

from mllm_deploy.compile import artifacts as art
from mllm_deploy.compile.build import calibrated_shadow_inputs, compile_artifacts, find_artifacts
from mllm_deploy.compile.bundle import bundle_profile_path, is_bundle, write_bundle
from mllm_deploy.compile.bundle_check import bundle_artifacts
from mllm_deploy.errors import UserError
from mllm_deploy.model import read_spec
from mllm_deploy.profile import load_profile
from mllm_deploy.resolve import resolve

BASE = [
    "prefill.chunk_size=8",
    "prefill.max_context=128",
    "calibration.samples=1",
    "calibration.tokens_per_sample=16",
    "outliers.scale_percentile=99.0",
    "device.npu_backend=ort-cpu",
]


def resolved_for(model, *settings, profile=None):
    loaded = load_profile(profile, [*([] if profile else [f"model.source={model}"]), *BASE, *settings])
    return resolve(loaded, pinned_host(), read_spec(loaded.profile.model.source, loaded.base_dir))


def build(resolved, messages=None, force=False):
    return compile_artifacts(
        resolved,
        force=force,
        log=(messages.append if messages is not None else lambda m: None),
        progress=lambda *a: None,
    )


def test_hit_reuses_the_entry_and_lockfile_records_the_build(smallest_gguf, private_cache):
    first = build(resolved_for(smallest_gguf))
    stamp = (first.root / "lock.json").stat().st_mtime_ns
    messages = []
    again = build(resolved_for(smallest_gguf), messages)
    assert again.root == first.root and (again.root / "lock.json").stat().st_mtime_ns == stamp
    assert not any("compiled" in m for m in messages)
    lock = json.loads((first.root / "lock.json").read_text())
    assert lock["chunk_size"] == 8 and lock["backend"] == "ort-cpu" and lock["target"] == "host"
    assert lock["model_identity"].startswith("sha256:") and set(lock["versions"]) >= {
        "onnx",
        "onnxruntime",
        "onnxruntime-qnn",
        "mllm-deploy",
    }
    assert sorted(p.name for p in (private_cache / "artifacts").iterdir()) == [first.root.name]  # no temp leftovers
    assert find_artifacts(resolved_for(smallest_gguf)).root == first.root
    assert calibrated_shadow_inputs(resolved_for(smallest_gguf)) == tuple(first.calibration.shadow_inputs)


@pytest.mark.parametrize(
    "change",
    [
        "prefill.chunk_size=16",
        "quantization.activations=uint16",
        "quantization.weights=int8-per-tensor",
        "outliers.policy=clip",
        "outliers.scale_percentile=99.5",
        "outliers.hot_channel_fraction=0.5",
        "outliers.prune_fraction=0.25",
        "calibration.samples=2",
        "calibration.tokens_per_sample=24",
    ],
)
def test_every_relevant_change_is_a_different_entry(smallest_gguf, private_cache, change):
    base = art.entry_key(art.expected_lock(resolved_for(smallest_gguf)))
    assert art.entry_key(art.expected_lock(resolved_for(smallest_gguf, change))) != base


def test_irrelevant_changes_share_the_entry_but_library_versions_do_not(smallest_gguf, private_cache, monkeypatch):
    base = art.entry_key(art.expected_lock(resolved_for(smallest_gguf)))
    assert (
        art.entry_key(art.expected_lock(resolved_for(smallest_gguf, "decode.temperature=0.5", "device.npu_threads=1")))
        == base
    )
    monkeypatch.setattr(
        art, "library_versions", lambda: {"mllm-deploy": "9", "onnx": "1", "onnxruntime": "1", "onnxruntime-qnn": "1"}
    )
    assert art.entry_key(art.expected_lock(resolved_for(smallest_gguf))) != base


@pytest.mark.parametrize("damage", ["truncate graph", "flip byte", "delete shadow", "delete manifest", "edit lock"])
def test_damaged_entry_is_rejected_with_a_message_and_rebuilt(smallest_gguf, private_cache, damage):
    entry = build(resolved_for(smallest_gguf, "outliers.prune_fraction=0.0")).root
    graph = entry / "graphs" / "layer1_down.onnx"
    if damage == "truncate graph":
        graph.write_bytes(graph.read_bytes()[:100])
    elif damage == "flip byte":
        data = bytearray(graph.read_bytes())
        data[-5] ^= 0xFF
        graph.write_bytes(bytes(data))
    elif damage == "delete shadow":
        next((entry / "shadow").iterdir()).unlink()
    elif damage == "delete manifest":
        (entry / "manifest.json").unlink()
    else:
        lock = json.loads((entry / "lock.json").read_text())
        lock["chunk_size"] = 999
        (entry / "lock.json").write_text(json.dumps(lock))
    with pytest.raises(art.EntryProblem):
        art.open_entry(entry, art.expected_lock(resolved_for(smallest_gguf, "outliers.prune_fraction=0.0")))
    messages = []
    rebuilt = build(resolved_for(smallest_gguf, "outliers.prune_fraction=0.0"), messages)
    assert any("rejected" in m and "recompiling" in m for m in messages), messages
    verified = art.expected_lock(resolved_for(smallest_gguf, "outliers.prune_fraction=0.0"))
    art.open_entry(rebuilt.root, verified)  # verifies


def test_half_written_entry_is_invisible(smallest_gguf, private_cache):
    resolved = resolved_for(smallest_gguf)
    key = art.entry_key(art.expected_lock(resolved))
    partial = art.artifacts_root() / f".{key}.interrupted"  # what a killed build leaves: a temp dir
    (partial / "graphs").mkdir(parents=True)
    (partial / "graphs" / "layer0_qkv.onnx").write_bytes(b"half")
    assert find_artifacts(resolved) is None
    entry = build(resolved)
    assert entry.root.name == key


def test_bundle_round_trip(smallest_gguf, private_cache, tmp_path):
    from mllm_deploy.interface.engines import obtain_decode_graphs

    resolved = resolved_for(smallest_gguf)
    entry = build(resolved)
    out = write_bundle(resolved, entry, tmp_path / "bundle", decode_graphs=obtain_decode_graphs(resolved))
    assert is_bundle(out) and not is_bundle(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["artifacts", "bundle.json", "decode", "model", "profile.toml"]
    loaded = load_profile(bundle_profile_path(out))
    assert load_profile(out).path == loaded.path == out / "profile.toml"  # the bundle dir stands for its profile
    assert loaded.profile.model.source == f"model/{smallest_gguf.name}"
    assert loaded.profile.prefill.chunk_size == 8 and loaded.profile.calibration.samples == 1
    spec = read_spec(loaded.profile.model.source, loaded.base_dir)
    in_bundle = bundle_artifacts(resolve(loaded, pinned_host(), spec))
    assert in_bundle.root == out / "artifacts" and in_bundle.calibration == entry.calibration
    (out / "artifacts" / "graphs" / "layer0_qkv.onnx").write_bytes(b"broken")
    with pytest.raises(UserError) as caught:
        bundle_artifacts(resolve(loaded, pinned_host(), spec))
    assert caught.value.exit_code == 3 and "rebuild" in caught.value.diagnostics[0].hint


def test_profile_loader_knows_the_bundle_file_names():
    from mllm_deploy.compile import bundle
    from mllm_deploy.profile import load as profile_load

    assert (profile_load.BUNDLE_INFO_NAME, profile_load.BUNDLE_PROFILE_NAME) == (
        bundle.BUNDLE_INFO,
        bundle.BUNDLE_PROFILE,
    )


def test_lockfile_for_a_snapdragon_target_records_its_htp_arch_and_soc():
    from mllm_deploy.compile.artifacts import expected_lock
    from mllm_deploy.device.catalog import catalog_entries
    from mllm_deploy.resolve import resolve

    loaded = load_profile(None, ["device.target=sd8gen3", "device.npu_backend=qnn-htp"])
    resolved = resolve(loaded, catalog_entries()["sd8gen3"], read_spec("builtin:smollm2-135m-instruct"))
    lock = expected_lock(resolved)
    assert (lock.htp_arch, lock.soc_model, lock.backend, lock.target) == (75, 57, "qnn-htp", "sd8gen3")


def test_a_graph_refused_by_the_audit_is_a_located_refusal_and_caches_nothing(
    smallest_gguf, private_cache, monkeypatch
):
    from mllm_deploy.compile import build as build_module
    from mllm_deploy.compile.audit import GraphAuditError
    from mllm_deploy.errors import ExitCode

    def refuse(path, **_):
        raise GraphAuditError(path.name, ["MatMul 'mm' runs in float"])

    monkeypatch.setattr(build_module, "audit_graph", refuse)
    with pytest.raises(UserError) as err:
        build(resolved_for(smallest_gguf))
    assert err.value.exit_code == ExitCode.CANNOT_RUN
    (diag,) = err.value.diagnostics
    assert "layer0_qkv.onnx was refused by the audit: MatMul 'mm' runs in float" in diag.message
    assert diag.key == "quantization" and "weights=int8-per-channel, activations=uint8" in str(diag.value)
    assert "nothing was cached" in diag.hint
    assert list((private_cache / "artifacts").iterdir()) == []  # no entry, no temp leftovers


def test_a_new_calibration_generator_rebuilds_samples_statistics_and_artifacts(
    smallest_gguf, private_cache, monkeypatch
):
    """Self-generated samples are cached apart from the artifacts; a new GENERATION_VERSION must
    not reuse the text an earlier generator wrote (that once made two caches' scales differ)."""
    from mllm_deploy.compile import build as build_module
    from mllm_deploy.compile import calibration_text

    lock = art.expected_lock(resolved_for(smallest_gguf))
    calls = []

    def produce(text):
        def run():
            calls.append(text)
            return [[1, 2, text]]

        return run

    assert build_module._cached_samples(lock, produce(3)) == [[1, 2, 3]]
    assert build_module._cached_samples(lock, produce(4)) == [[1, 2, 3]]  # cached
    monkeypatch.setattr(calibration_text, "GENERATION_VERSION", calibration_text.GENERATION_VERSION + 1)
    newer = art.expected_lock(resolved_for(smallest_gguf))
    assert art.entry_key(newer) != art.entry_key(lock) and art.stats_key(newer) != art.stats_key(lock)
    assert build_module._cached_samples(newer, produce(5)) == [[1, 2, 5]]
    assert calls == [3, 5]
