"""A phone (qnn-htp) profile or bundle on this x86 machine: refused without an opt-in, labelled
emulation or simulator with one, and a context binary whose recorded arch/SoC differs from its
lockfile (or from the device's Hexagon) refused before it loads. On tiny_models.SMALLEST
(2 layers, hidden 32), targeting sd8gen3: a qnn-htp build of it takes ~3 s here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from mllm_deploy.compile.artifacts import open_entry
from mllm_deploy.compile.context_check import check_context_compatibility
from mllm_deploy.device import HostProbe, MachineHere, hexagon_here, this_machine
from mllm_deploy.device.catalog import catalog_entries

pytest.importorskip("onnxruntime_qnn")  # the qnn-htp build compiles context binaries with it

GOLDEN_PROBE = json.loads((Path(__file__).parent / "golden" / "host_probe.json").read_text())


def mllm(*args: str, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLLM_DEPLOY_CACHE": str(cache), "MLLM_DEPLOY_DATA": str(cache) + "-data"}
    return subprocess.run([sys.executable, "-m", "mllm_deploy", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def phone(smallest_gguf):
    """The --set arguments of a cheap sd8gen3 profile of the smallest tiny model."""
    settings = [f"model.source={smallest_gguf}", "device.target=sd8gen3", "prefill.chunk_size=32",
                "prefill.max_context=128", "calibration.samples=2", "calibration.tokens_per_sample=48"]  # fmt: skip
    return [part for s in settings for part in ("--set", s)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module (artifacts built once), with this machine's probe."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", autouse=True)
def no_hexagon(cache):
    os.environ["MLLM_DEPLOY_CACHE"], old = str(cache), os.environ.get("MLLM_DEPLOY_CACHE")
    try:
        here = this_machine()
    finally:
        os.environ.pop("MLLM_DEPLOY_CACHE") if old is None else os.environ.__setitem__("MLLM_DEPLOY_CACHE", old)
    if here.hexagon is not None:
        pytest.skip("this machine has a Hexagon NPU: a phone target runs here without an opt-in")
    return here


def test_a_phone_profile_is_refused_without_an_opt_in(phone, cache):
    done = mllm("run", *phone, "--prompt", "hi", "--max-new-tokens", "2", cache=cache)
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert "error: device.target: sd8gen3 needs a Hexagon NPU (HTP v75); this machine has " in done.stderr
    assert "hint: use --emulate (the same graphs on the CPU, labelled emulation)" in done.stderr
    assert not (cache / "artifacts").exists()  # refused before anything was built
    for command in (["chat"], ["eval", "--text", __file__], ["bench", "--prompt-tokens", "16"], ["up"]):
        refused = mllm(*command, *phone, cache=cache)
        assert refused.returncode == 3 and "sd8gen3 needs a Hexagon NPU (HTP v75)" in refused.stderr, command


def test_emulate_runs_the_phone_graphs_on_the_cpu_and_says_so(phone, cache):
    done = mllm("run", *phone, "--emulate", "--prompt", "hi", "--max-new-tokens", "3", "--json", cache=cache)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["backend"].startswith("ort-cpu emulation of sd8gen3's graphs (")
    assert result["generated_tokens"] == 3
    # only what runs was compiled: the QDQ graphs, no QNN context binaries
    (entry,) = (cache / "artifacts").iterdir()
    assert len(list((entry / "graphs").glob("*.onnx"))) == 8 and not (entry / "contexts").exists()
    streamed = mllm("run", *phone, "--emulate", "--raw", "--prompt", "hi", "--max-new-tokens", "2", cache=cache)
    assert streamed.returncode == 0, streamed.stderr
    assert "| backend ort-cpu emulation of sd8gen3's graphs (" in streamed.stderr.splitlines()[-1]
    bench = mllm("bench", *phone, "--emulate", "--prompt-tokens", "16", "--gen-tokens", "2", "--repeat", "1",
                 "--warmup", "0", "--json", cache=cache)  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    (row,) = json.loads(bench.stdout)
    usable = len(os.sched_getaffinity(0))
    assert (row["target"], row["runs_as"]) == ("sd8gen3", "emulation")
    assert row["backend"]["npu"].startswith("ort-cpu emulation of sd8gen3's graphs (")
    assert row["threads"] == {"cpu": min(8, usable), "npu": max(1, usable // 2), "target_cpu": 8}


def test_simulator_is_labelled(phone, cache):
    done = mllm("run", *phone, "--simulator", "--prompt", "hi", "--max-new-tokens", "2", "--json", cache=cache)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["backend"] == "QNN HTP simulator v75 (x86-64)"
    entries = [e for e in (cache / "artifacts").iterdir() if not e.name.startswith(".")]
    assert [len(list((e / "contexts").glob("*.ctx.onnx"))) for e in entries] == [8]  # the emulated entry, completed
    assert "warning: QNN HTP on this machine is Qualcomm's x86 simulator (200-700x slower" in done.stderr


@pytest.fixture(scope="module")
def bundle(phone, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "phone"
    done = mllm("build", *phone, "--out", str(out), cache=cache)
    assert done.returncode == 0, done.stderr
    return out


def test_a_bundle_of_context_binaries_only_cannot_be_emulated(bundle, cache):
    lock = json.loads((bundle / "bundle.json").read_text())
    if any(rel.startswith("artifacts/graphs/") for rel in lock["files"]):
        pytest.skip("this build ships the QDQ graphs in qnn-htp bundles")
    done = mllm("run", str(bundle), "--emulate", "--prompt", "hi", cache=cache)
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert "ships its QNN context binaries only: --emulate has no QDQ graphs to run on the CPU provider" in done.stderr
    plain = mllm("run", str(bundle), "--prompt", "hi", cache=cache)
    assert plain.returncode == 3 and "which this machine cannot run: it has no Hexagon NPU" in plain.stderr
    assert "hint: run it here with --simulator" in plain.stderr and "--emulate" not in plain.stderr


def _retarget_context(bundle: Path, rel: str, arch: int, soc: int) -> Path:
    """Rewrite the ep_compatibility_info of one context binary (and its size and sha256 in the
    bundle's lockfile, so only the recorded arch/SoC differs)."""
    path = bundle / rel
    model = onnx.load(str(path), load_external_data=False)
    (entry,) = [p for p in model.metadata_props if p.key == "ep_compatibility_info.QNNExecutionProvider"]
    fields = entry.value.split(":")
    fields[4], fields[5] = str(arch), str(soc)
    entry.value = ":".join(fields)
    onnx.save(model, str(path))
    lock_file = bundle / "bundle.json"
    lock = json.loads(lock_file.read_text())
    data = path.read_bytes()
    lock["files"][rel] = {**lock["files"][rel], "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    lock_file.write_text(json.dumps(lock))
    return path


def test_a_context_binary_compiled_for_another_arch_is_refused_before_it_loads(bundle, cache, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "tampered"))
    intact = mllm("run", str(copy), "--simulator", "--prompt", "hi", "--max-new-tokens", "2", "--json", cache=cache)
    assert intact.returncode == 0, intact.stderr
    tampered = _retarget_context(copy, "artifacts/contexts/layer1_qkv.ctx.onnx", 73, 43)
    done = mllm("run", str(copy), "--simulator", "--prompt", "hi", "--max-new-tokens", "2", cache=cache)
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert (
        f"{tampered.resolve()}: error: ep_compatibility_info: the context binary was compiled for HTP v73, SoC 43; "
        "its lockfile says HTP v75, SoC 57" in done.stderr
    )


def test_a_context_binary_for_another_soc_is_refused_on_that_device(bundle):
    artifacts = open_entry(bundle / "artifacts", None, verify_checksums=False)
    probe = HostProbe.model_validate({**GOLDEN_PROBE, "machine": "aarch64", "qnn_htp_mode": "device",
                                      "soc_machine": "SM8550"})  # fmt: skip
    phone = MachineHere(probe, hexagon_here(probe, catalog_entries()))
    with pytest.raises(Exception) as refused:
        check_context_compatibility(artifacts, phone)
    (diag,) = refused.value.diagnostics
    assert diag.message == (
        "the context binary was compiled for HTP v75, SoC 57; this machine's Hexagon NPU is HTP v73, SoC 43 (SM8550)"
    )
    assert diag.file is not None and diag.file.endswith(".ctx.onnx") and refused.value.exit_code == 3
    probe_gen3 = probe.model_copy(update={"soc_machine": "SM8650"})
    check_context_compatibility(artifacts, MachineHere(probe_gen3, hexagon_here(probe_gen3, catalog_entries())))
