"""Deploy for real (issue 16): build a bundle of the default profile on the host, then run it with
nothing else — an empty cache and the model file it was built from deleted — and refuse, before
anything is read or written, a bundle that is damaged, incomplete, of an unknown format, or built
for a target or libraries this machine cannot run. Every command goes through the CLI in a
subprocess, as a user would run it.

The bundle is built from the artifact cache the other real-model tests share (`shared_npu_cache`):
warm, the module takes ~40 s here; cold, calibrating and compiling the default profile adds a few
minutes once per test session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import tiny_models
from conftest import cache_env

from mllm_deploy.cli.eval_cmd import report_text
from mllm_deploy.compile.bundle_contents import BUNDLE_PARTS, bundle_sizes
from mllm_deploy.compile.bundle_lock import BUNDLE_FORMAT, BundleLock
from mllm_deploy.errors import UserError
from mllm_deploy.eval import reference as reference_module
from mllm_deploy.eval.report import evaluate_profile
from mllm_deploy.interface.deployment import load_deployment
from mllm_deploy.model import read_spec
from mllm_deploy.paths import sha256_file

pytestmark = pytest.mark.slow

PROFILE = """\
name = "deploy-test"

[model]
source = "models/smollm2.gguf"

[decode]
temperature = 0.0
max_new_tokens = 24
"""
# ~300 tokens: two chunks of 256, so the DAG prefill, the shadow rows and the int8 KV cache all run
PROMPT = " ".join(
    [
        "A phone's neural processing unit is fast only at eight-bit integer work on graphs whose shapes",
        "never change, and it is slow or unable at floating point and dynamic shapes. Prefill is bound",
        "by compute, so it belongs on the NPU; decoding one token at a time is bound by memory and stays",
        "on the CPU. The prompt is cut into chunks of a fixed size, and every static graph is compiled",
        "once per layer and shared by all chunks, while attention, whose shape grows with the context,",
        "runs on the CPU in float over the cache of keys and values that earlier chunks wrote. A few",
        "activation channels hold values far beyond the range of a per-tensor scale; they are clamped",
        "on the NPU and their exact contribution is added on the CPU, in parallel, from rows of the",
        "weights kept in float. Which subgraph runs next is decided by a greedy rule that prefers the",
        "work that unblocks the most NPU time. The graphs are built ahead of time on a host machine and",
        "shipped to the device in one bundle, with a lockfile that records the target, the libraries,",
        "the model and the checksum of every file, so that a device never compiles anything and never",
        "runs a bundle that does not fit it. The engineer copies the bundle to the phone, runs it, and",
        "checks that the answers match the host's, token for token, before the release goes out to",
        "users. When something is wrong, the tool says which file, which field, what it expected and",
        "what it found, and it stops before it writes anything. The same bundle runs on the laptop",
        "under the emulated NPU, so the release can be tested there first. In the end, the",
    ]
)
BIG = 5 * 1024 * 1024  # "nothing big": what a bundle's run may leave in an empty cache, at most


def mllm(*args: str, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLLM_DEPLOY_CACHE": str(cache), "MLLM_DEPLOY_DATA": str(cache) + "-data"}
    return subprocess.run(
        [sys.executable, "-m", "mllm_deploy", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def run_args(prompt_file: Path) -> list[str]:
    return ["--raw", "--prompt-file", str(prompt_file), "--json"]


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


@dataclass(frozen=True)
class Deployed:
    root: Path
    bundle: Path
    profile: Path
    prompt: Path
    model_copy: Path
    build_stdout: str
    reference: dict

    @property
    def lock(self) -> BundleLock:
        return BundleLock.model_validate_json((self.bundle / "bundle.json").read_text())


@pytest.fixture(scope="module")
def deployed(shared_npu_cache, tmp_path_factory) -> Deployed:
    """The default profile (its model a copy in tmp) built into a bundle, the profile run that built
    it (greedy), then the copy of the model deleted."""
    root = tmp_path_factory.mktemp("deploy")
    model = root / "models" / "smollm2.gguf"
    model.parent.mkdir()
    shutil.copyfile(read_spec("builtin:smollm2-135m-instruct").path, model)
    (root / "deploy.toml").write_text(PROFILE)
    (root / "prompt.txt").write_text(PROMPT)
    with cache_env(shared_npu_cache):
        build = mllm("build", str(root / "deploy.toml"), "--out", str(root / "bundle"), cache=shared_npu_cache,
                     timeout=3600)  # fmt: skip
        assert build.returncode == 0, build.stderr[-3000:]
        reference = mllm("run", str(root / "deploy.toml"), *run_args(root / "prompt.txt"), cache=shared_npu_cache)
        assert reference.returncode == 0, reference.stderr[-3000:]
    model.unlink()
    return Deployed(root, root / "bundle", root / "deploy.toml", root / "prompt.txt", model, build.stdout,
                    json.loads(reference.stdout))  # fmt: skip


def linked_copy(bundle: Path, dest: Path) -> Path:
    """A copy of `bundle` whose files are hard links (instant); replace a file before changing it."""
    shutil.copytree(bundle, dest, copy_function=os.link)
    return dest


def own_copy(path: Path) -> None:
    """Break the hard link of `path`, so changing it leaves the original bundle alone."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)


def edit_lock(bundle: Path, **changes) -> None:
    lock_file = bundle / "bundle.json"
    data = json.loads(lock_file.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    lock_file.unlink()
    lock_file.write_text(json.dumps(data))


def assert_refused_before_anything(proc: subprocess.CompletedProcess[str], cache: Path, exit_code: int) -> str:
    """Refused with `exit_code`, one error, no traceback, nothing run and nothing big written."""
    assert proc.returncode == exit_code, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.count("error:") == 1, proc.stderr
    for built in ("artifacts", "decode", "weights", "verified-bundles.json"):
        assert not (cache / built).exists(), built
    return proc.stderr


# -- what the bundle holds ---------------------------------------------------------------------


def test_the_lockfile_records_the_build_and_every_file(deployed):
    lock = deployed.lock
    assert (lock.format_version, lock.target, lock.backend, lock.htp_arch, lock.soc_model) == (
        BUNDLE_FORMAT, "host", "ort-cpu", None, None,
    )  # fmt: skip
    assert lock.chunk_size == 256 and lock.decode_weight_block == 64
    assert lock.accuracy is not None and lock.accuracy.ppl_ratio <= lock.accuracy.max_ppl_ratio == 1.05
    assert (lock.kv_cache.storage, lock.kv_cache.layers, lock.kv_cache.kv_heads, lock.kv_cache.head_dim) == (
        "int8", 30, 3, 64,
    )  # fmt: skip
    builtin = read_spec("builtin:smollm2-135m-instruct")
    assert lock.model.identity == f"sha256:{builtin.file_sha256}" and lock.model.source == "model/smollm2.gguf"
    assert lock.versions.onnxruntime == metadata.version("onnxruntime")
    on_disk = {p.relative_to(deployed.bundle).as_posix() for p in deployed.bundle.rglob("*") if p.is_file()}
    assert set(lock.files) == on_disk - {"bundle.json"}
    for rel in ("model/smollm2.gguf", "decode/step_kv8.onnx", "artifacts/graphs/layer7_down.onnx"):
        path = deployed.bundle / rel
        assert lock.files[rel].size == path.stat().st_size and lock.files[rel].sha256 == sha256_file(path)
    assert "decode/step.onnx" not in lock.files  # only the step graph of the bundle's (int8) KV cache
    assert sum(1 for rel in lock.files if rel.startswith("artifacts/graphs/")) == 120
    assert lock.latencies is not None and lock.latencies.source == "build-host"  # ort-cpu: profiled where it runs
    # the model: the original's identity, but only what a run reads (the graphs hold the linears)
    assert lock.model.trimmed and lock.files["model/smollm2.gguf"].size < builtin.file_bytes / 2
    # ... nor the tied Q8_0 embedding: the decode head's blocks of 32 are its one copy (30.1 MB)
    from mllm_deploy.model.gguf_file import GGUFFile
    from mllm_deploy.model.gguf_trim import embedding_in_head

    trimmed = GGUFFile(deployed.bundle / "model" / "smollm2.gguf")
    assert "token_embd.weight" not in trimmed.tensors and embedding_in_head(trimmed) is not None
    assert lock.files["model/smollm2.gguf"].size < 3_000_000 < 30_000_000 < lock.files["decode/head.onnx.data"].size
    assert "profiled at build on ort-cpu emulation" in lock.latencies.detail


def test_build_prints_each_part_and_the_total(deployed):
    sizes = bundle_sizes(deployed.lock)
    out = deployed.build_stdout
    for part in BUNDLE_PARTS:
        files, size = sizes[part]
        assert f"  {part:<17}{files:>5} files {size / 1e6:>9.1f} MB" in out, part
    total = sum(size for _, size in sizes.values())
    assert f"{total / 1e6:.1f} MB" in out and sizes["decode graphs"][0] == 4 and sizes["context binaries"] == (0, 0)
    assert sizes["model"][1] == deployed.lock.files["model/smollm2.gguf"].size


def test_the_bundle_profile_holds_only_what_the_user_set(deployed):
    profile = tomllib.loads((deployed.bundle / "profile.toml").read_text())
    assert profile == {
        "schema_version": 1,
        "name": "deploy-test",
        "model": {"source": "model/smollm2.gguf"},
        "device": {"npu_backend": "ort-cpu"},  # "auto" chose it on the host: pinned for any machine
        "decode": {"temperature": 0.0, "max_new_tokens": 24},
    }


# -- running from the bundle alone -------------------------------------------------------------


def test_run_from_the_bundle_alone_matches_the_profile_run_token_for_token(deployed, tmp_path):
    assert not deployed.model_copy.exists()
    cache = tmp_path / "empty-cache"
    proc = mllm("run", str(deployed.bundle), *run_args(deployed.prompt), cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, reference = json.loads(proc.stdout), deployed.reference
    assert reference["prompt_tokens"] > 256 and reference["generated_tokens"] >= 12  # two chunks, greedy
    for key in ("text", "prompt_tokens", "generated_tokens", "finish_reason", "backend"):
        assert result[key] == reference[key], key
    assert result["backend"].startswith("ort-cpu emulation")
    assert "error" not in proc.stderr and "warning" not in proc.stderr
    # nothing was calibrated, compiled, dequantized or built into the cache: a few small files only
    assert {p.name for p in cache.iterdir()} <= {"host-probe.json", "verified-bundles.json"}
    assert dir_bytes(cache) < BIG


def test_validate_and_plan_take_the_bundle(deployed, tmp_path):
    cache = tmp_path / "cache"
    valid = mllm("validate", str(deployed.bundle), cache=cache)
    assert valid.returncode == 0 and "deploy-test" in valid.stdout and valid.stderr == ""
    plan = mllm("plan", str(deployed.bundle), cache=cache)
    assert plan.returncode == 0 and "model/smollm2.gguf" in plan.stdout and "chunk(s) of 256" in plan.stdout
    assert dir_bytes(cache) < BIG


def test_a_graph_override_is_refused_on_the_bundle(deployed, tmp_path):
    proc = mllm("run", str(deployed.bundle), "--set", "prefill.chunk_size=128", "--prompt", "hi", cache=tmp_path / "c")
    assert proc.returncode == 2 and "prefill.chunk_size" in proc.stderr and "Traceback" not in proc.stderr


# -- refusals --------------------------------------------------------------------------------------


def test_a_byte_changed_in_a_graph_is_refused_naming_the_file(deployed, tmp_path):
    bundle = linked_copy(deployed.bundle, tmp_path / "bundle")
    graph = bundle / "artifacts" / "graphs" / "layer12_gate_up.onnx"
    own_copy(graph)
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    err = assert_refused_before_anything(mllm("run", str(bundle), "--prompt", "hi", cache=cache), cache, 3)
    expected = deployed.lock.files["artifacts/graphs/layer12_gate_up.onnx"].sha256
    assert (
        f"{graph.resolve()}: error: bundle {bundle.resolve()}: artifacts/graphs/layer12_gate_up.onnx has sha256 " in err
    )
    assert f"its lockfile says {expected[:16]}" in err and sha256_file(graph)[:16] in err


def test_a_truncated_file_is_refused_with_both_sizes(deployed, tmp_path):
    bundle = linked_copy(deployed.bundle, tmp_path / "bundle")
    shadow = sorted((bundle / "artifacts" / "shadow").iterdir())[0]
    own_copy(shadow)
    size = shadow.stat().st_size
    with open(shadow, "r+b") as fh:
        fh.truncate(size - 100)
    cache = tmp_path / "cache"
    err = assert_refused_before_anything(mllm("run", str(bundle), "--prompt", "hi", cache=cache), cache, 3)
    assert f"has {size - 100} bytes; its lockfile says {size}" in err and shadow.name in err


def test_a_missing_file_is_refused(deployed, tmp_path):
    bundle = linked_copy(deployed.bundle, tmp_path / "bundle")
    (bundle / "decode" / "step_kv8.onnx").unlink()
    cache = tmp_path / "cache"
    err = assert_refused_before_anything(mllm("run", str(bundle), "--prompt", "hi", cache=cache), cache, 3)
    assert f"bundle {bundle.resolve()}: decode/step_kv8.onnx is missing (its lockfile lists " in err


def test_a_bundle_for_a_target_this_machine_cannot_run_is_refused(deployed, tmp_path):
    cache = tmp_path / "cache"
    if _has_hexagon(cache):
        pytest.skip("this machine has a Hexagon NPU")
    bundle = linked_copy(deployed.bundle, tmp_path / "bundle")
    edit_lock(bundle, target="sd8gen3", backend="qnn-htp", htp_arch=75, soc_model=57)
    err = mllm("run", str(bundle), "--prompt", "hi", cache=cache)
    assert err.returncode == 3 and "Traceback" not in err.stderr, err.stderr
    assert (
        f"bundle {bundle.resolve()} is built for sd8gen3 (qnn-htp, HTP v75, SoC 57), which this machine cannot run"
        in err.stderr
    )
    assert "allowed: ort-cpu bundles" in err.stderr  # what this machine can run
    assert not (cache / "verified-bundles.json").exists() and not (cache / "artifacts").exists()


def _has_hexagon(cache: Path) -> bool:
    from mllm_deploy.device.probe import probe_host

    old = os.environ.get("MLLM_DEPLOY_CACHE")
    os.environ["MLLM_DEPLOY_CACHE"] = str(cache)
    try:
        return probe_host().qnn_htp_mode == "device"
    finally:
        if old is None:
            os.environ.pop("MLLM_DEPLOY_CACHE")
        else:
            os.environ["MLLM_DEPLOY_CACHE"] = old


@pytest.mark.parametrize(
    ("changes", "exit_code", "says"),
    [
        ({"format_version": 2}, 3, "format_version: bundle {b}: this mllm-deploy"),
        ({"format_version": None}, 3, "reads bundle format 3; the bundle has format None"),
        ({"backend": "qnn-htp", "htp_arch": 75, "soc_model": 57, "versions__onnxruntime_qnn": "0.0.1"}, 3,
         "versions.onnxruntime_qnn: bundle {b}: its QNN context binaries were compiled with onnxruntime-qnn 0.0.1"),
        ({"chunk_size": 128}, 3, "its lockfile says chunk_size = 128, but its artifacts were built with 256"),
        ({"files__profile.toml__size": -1}, 2, "files.profile.toml.size"),
    ],
)  # fmt: skip
def test_a_lockfile_that_does_not_fit_is_refused_naming_the_field(deployed, tmp_path, changes, exit_code, says):
    bundle = linked_copy(deployed.bundle, tmp_path / "bundle")
    edit_lock(bundle, **changes)
    cache = tmp_path / "cache"
    err = assert_refused_before_anything(mllm("validate", str(bundle), cache=cache), cache, exit_code)
    assert says.format(b=bundle.resolve()) in err and f"{bundle.resolve() / 'bundle.json'}: error:" in err


def test_a_bundle_without_its_lockfile_is_refused(deployed, tmp_path):
    bundle = linked_copy(deployed.bundle, tmp_path / "bundle")
    (bundle / "bundle.json").unlink()
    cache = tmp_path / "cache"
    err = assert_refused_before_anything(mllm("run", str(bundle), "--prompt", "hi", cache=cache), cache, 3)
    assert f"bundle {bundle.resolve()}: its lockfile bundle.json is missing" in err


def test_a_lockfile_that_does_not_parse_is_invalid(deployed, tmp_path):
    bundle = linked_copy(deployed.bundle, tmp_path / "bundle")
    (bundle / "bundle.json").unlink()
    (bundle / "bundle.json").write_text('{"format_version": 2,')
    cache = tmp_path / "cache"
    err = assert_refused_before_anything(mllm("plan", str(bundle), cache=cache), cache, 2)
    assert "its lockfile does not parse as JSON" in err


def test_another_onnxruntime_is_a_warning_for_cpu_graphs(deployed, tmp_path):
    bundle = linked_copy(deployed.bundle, tmp_path / "bundle")
    edit_lock(bundle, versions__onnxruntime="1.0.0")
    proc = mllm("validate", str(bundle), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    here = metadata.version("onnxruntime")
    assert (
        f"warning: versions.onnxruntime: bundle {bundle.resolve()} was built with onnxruntime 1.0.0; this machine has {here}"
        in proc.stderr
    )


def test_an_archive_is_refused_with_how_to_unpack_it(deployed, tmp_path):
    archive = tmp_path / "bundle.tar"
    archive.write_bytes(b"\0" * 1024)
    proc = mllm("run", str(archive), "--prompt", "hi", cache=tmp_path / "cache")
    assert proc.returncode == 2 and "unpack it first" in proc.stderr and f"tar xf {archive}" in proc.stderr


# -- a small bundle: the archive, a chat template file --------------------------------------------


def test_archive_and_a_chat_template_file_go_into_the_bundle(smallest_gguf, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>")
    profile = tmp_path / "tiny.toml"
    profile.write_text(
        f'name = "tiny"\n[model]\nsource = "{smallest_gguf}"\nchat_template = "chat.jinja"\n'
        "[prefill]\nchunk_size = 8\nmax_context = 64\n[calibration]\nsamples = 1\ntokens_per_sample = 16\n"
        "[accuracy]\nmax_ppl_ratio = 2.0\n"  # a tiny random model: ~1.4x
    )
    cache = tmp_path / "cache"
    build = mllm("build", str(profile), "--out", str(tmp_path / "out" / "tiny"), "--archive", cache=cache)
    assert build.returncode == 0, build.stderr
    archive = tmp_path / "out" / "tiny.tar"
    assert f"archive: {archive}" in build.stdout and not list((tmp_path / "out").glob(".*"))  # no temporary left
    reference = mllm("run", str(profile), "--prompt", "hi", "--max-new-tokens", "3", "--json", cache=cache)
    assert reference.returncode == 0, reference.stderr
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "device", filter="data")
    assert {
        "tiny/bundle.json",
        "tiny/profile.toml",
        "tiny/model/templates/chat.jinja",
        "tiny/decode/head.onnx",
    } <= names
    unpacked = tmp_path / "device" / "tiny"
    assert tomllib.loads((unpacked / "profile.toml").read_text())["model"] == {
        "source": f"model/{smallest_gguf.name}",
        "chat_template": "model/templates/chat.jinja",
    }
    template.unlink()  # the bundle's copy is what renders the chat
    run = mllm(
        "run", str(unpacked), "--prompt", "hi", "--max-new-tokens", "3", "--json", cache=tmp_path / "device-cache"
    )
    assert run.returncode == 0, run.stderr
    got, want = json.loads(run.stdout), json.loads(reference.stdout)
    assert (got["text"], got["prompt_tokens"], got["generated_tokens"]) == (
        want["text"], want["prompt_tokens"], want["generated_tokens"],
    )  # fmt: skip


def test_the_bundle_profile_pins_the_backend_and_leaves_out_calibration_text(tmp_path):
    from mllm_deploy.compile.bundle_profile import bundle_profile_toml
    from mllm_deploy.profile import load_profile

    (tmp_path / "calib.txt").write_text("some text")
    profile = tmp_path / "p.toml"
    profile.write_text('name = "p"\n[calibration]\nsource = "calib.txt"\nsamples = 2\n[decode]\ntop_k = 5\n')
    loaded = load_profile(str(profile), ["decode.temperature=0.7"])
    text = bundle_profile_toml(loaded, backend="ort-cpu", model_source="model/m.gguf", chat_template=None)
    assert '# Calibrated at build with calibration.source = "calib.txt"' in text
    assert tomllib.loads(text) == {
        "schema_version": 1,
        "name": "p",
        "model": {"source": "model/m.gguf"},
        "device": {"npu_backend": "ort-cpu"},
        "calibration": {"samples": 2},
        "decode": {"temperature": 0.7, "top_k": 5},
    }


# -- only what the target loads (issue 16): hot shadow rows, no QDQ graphs in a qnn-htp bundle ----


def test_shadow_files_hold_float_rows_of_the_hot_channels_only(deployed):
    from mllm_deploy.compile.calibration import CalibrationResult
    from mllm_deploy.compile.shadow_store import read_index

    artifacts = deployed.bundle / "artifacts"
    cal = CalibrationResult.model_validate_json((artifacts / "calibration.json").read_text())
    float_bytes = hot_rows = 0
    for layer, kind in cal.shadow_inputs:
        index = read_index(artifacts, layer, kind)
        hot = np.load(artifacts / "shadow" / index.hot_file, mmap_mode="r")
        assert index.hot_channels == cal.input(layer, kind).hot_channels and hot.shape[0] == len(index.hot_channels)
        assert [c.type for c in index.cold] == ["Q4_1"] * len(index.cold)  # the GGUF's own blocks
        hot_rows += hot.shape[0]
        float_bytes += index.n_in * hot.shape[1] * 4
    assert hot_rows == sum(len(cal.input(layer, kind).hot_channels) for layer, kind in cal.shadow_inputs) > 0
    shadow_bytes = bundle_sizes(deployed.lock)["shadow rows"][1]
    assert shadow_bytes < float_bytes / 5  # float32 rows of every channel, as before: 197 MB


@dataclass(frozen=True)
class TinyQnn:
    profile: Path
    cache: Path
    bundle: Path
    build_stdout: str


@pytest.fixture(scope="module")
def tiny_qnn(tmp_path_factory) -> TinyQnn:
    """A 2-layer Q4_1 model built for sd8gen3 (qnn-htp): context binaries compiled on the x86
    simulator (~5 s with the accuracy gate)."""
    root = tmp_path_factory.mktemp("tiny-qnn")
    model = tiny_models.write_tiny_gguf(root, tied=True, cfg=tiny_models.SMALLEST, weight_type="Q4_1")
    profile = root / "qnn.toml"
    profile.write_text(
        f'name = "tiny-qnn"\n[model]\nsource = "{model}"\n[device]\ntarget = "sd8gen3"\nnpu_backend = "qnn-htp"\n'
        "[prefill]\nchunk_size = 32\nmax_context = 64\n[calibration]\nsamples = 1\ntokens_per_sample = 32\n"
        "[accuracy]\nmax_ppl_ratio = 2.0\n"  # a tiny random model: ~1.1x
        "[decode]\nweight_bits = 4\nweight_block = 32\n"  # as the Snapdragon profiles: Q4_1 held exactly
    )
    build = mllm("build", str(profile), "--out", str(root / "bundle"), cache=root / "cache")
    assert build.returncode == 0, build.stderr
    return TinyQnn(profile, root / "cache", root / "bundle", build.stdout)


def test_a_qnn_bundle_ships_context_binaries_no_qdq_graphs_and_no_simulator_latencies(tiny_qnn, tmp_path):
    # the build's latencies are the device cost model, and it says so (the simulator is not timed)
    assert "the device cost model" in tiny_qnn.build_stdout, tiny_qnn.build_stdout
    assert "not timed on Qualcomm's x86 HTP simulator" in tiny_qnn.build_stdout
    from mllm_deploy.compile.artifacts import Manifest
    from mllm_deploy.plan import build_plan
    from mllm_deploy.profile import load_profile
    from mllm_deploy.resolve import resolve_profile

    profile, cache, bundle = tiny_qnn.profile, tiny_qnn.cache, tiny_qnn.bundle
    lock = BundleLock.model_validate_json((bundle / "bundle.json").read_text())
    sizes = bundle_sizes(lock)
    assert sizes["graphs"] == (0, 0) and sizes["context binaries"][0] == 2 * 4  # 2 layers x 4 kinds
    assert not any(rel.startswith("artifacts/graphs/") for rel in lock.files)
    manifest = Manifest.model_validate_json((bundle / "artifacts" / "manifest.json").read_text())
    assert {rel for rel in manifest.files if rel.startswith("contexts/")} == {
        f"contexts/layer{layer}_{kind}.ctx.onnx" for layer in (0, 1) for kind in ("qkv", "o_proj", "gate_up", "down")
    } and not any(rel.startswith("graphs/") for rel in manifest.files)
    # the scheduler's seed: the device cost model (45 INT8 TOPS x the plan's op counts), not the simulator's
    assert lock.latencies is not None and lock.latencies.source == "device-cost-model"
    assert "45 INT8 TOPS" in lock.latencies.detail and "latencies.soc57.json" in lock.latencies.detail
    shipped = json.loads((bundle / "artifacts" / "latencies.json").read_text())
    # the build did not time the simulator either: its cache entry holds the same cost model
    built = json.loads(next((cache / "artifacts").glob("*/latencies.json")).read_text())
    assert shipped == built and len(built) == 2 * 4
    with cache_env(cache):
        resolved = resolve_profile(load_profile(str(profile)))
        plan = build_plan(resolved, prompt_tokens=32)
    ops = {f"{s.layer}/{s.kind}": s.ops for s in plan.subgraphs if s.chunk == 0 and s.processor == "npu"}
    assert shipped == pytest.approx({k: ops[k] / 45e12 * 1e3 for k in shipped}, rel=1e-12)
    # opening it on this x86 host: refused (no Hexagon NPU); its files are intact and list no graphs
    proc = mllm("run", str(bundle), "--prompt", "hi", cache=tmp_path / "device-cache")
    assert proc.returncode == 3 and "which this machine cannot run" in proc.stderr
    assert not list(bundle.glob("latencies.soc*.json"))  # nothing measured or written off the device


def test_on_a_device_the_first_run_profiles_the_graphs_next_to_the_bundle(tiny_qnn, monkeypatch):
    """The kernels' seed latencies: on the simulator the bundle's cost model; where the probe reports
    a Hexagon NPU, the graphs timed there (the probe's answer is patched to say so; the graphs really
    run, on the simulator) and stored as latencies.soc57.json, which the next open reads."""
    from mllm_deploy.compile.artifacts import open_entry
    from mllm_deploy.compile.bundle_check import open_bundle
    from mllm_deploy.profile import load_profile
    from mllm_deploy.resolve import resolve_profile
    from mllm_deploy.runtime import device_latency
    from mllm_deploy.runtime.npu_kernels import load_npu_kernels

    with cache_env(tiny_qnn.cache):
        if device_latency.on_hexagon_device():
            pytest.skip("this machine has a Hexagon NPU: the first half needs the simulator")
        resolved = resolve_profile(load_profile(str(tiny_qnn.profile)))
        artifacts = open_entry(tiny_qnn.bundle / "artifacts", None)
        shipped_files = BundleLock.model_validate_json((tiny_qnn.bundle / "bundle.json").read_text()).files.keys()
        shipped = {(int(k.split("/")[0]), k.split("/")[1]): v for k, v in artifacts.latencies_ms.items()}
        here = load_npu_kernels(resolved, artifacts)  # x86: Qualcomm's simulator
        assert here.latencies_ms() == shipped and here.latency_source == "the artifacts' latencies.json"
        assert not (tiny_qnn.bundle / "latencies.soc57.json").exists()
        monkeypatch.setattr(device_latency, "on_hexagon_device", lambda: True)
        first = load_npu_kernels(resolved, artifacts)
        stored = tiny_qnn.bundle / "latencies.soc57.json"
        assert stored.is_file() and str(stored) in first.latency_source
        assert set(first.latencies_ms()) == set(shipped) and first.latencies_ms() != shipped
        again = load_npu_kernels(resolved, artifacts)
        assert again.latencies_ms() == first.latencies_ms() and "at its first run" in again.latency_source
        # not one of the bundle's files: every listed file still verifies, the lockfile unchanged
        assert open_bundle(tiny_qnn.bundle, rehash=True, allow_simulator=True).lock.files.keys() == shipped_files
    stored.unlink()


def test_eval_on_the_bundle_finds_the_original_model_for_its_float_baseline(deployed, tmp_path):
    """The bundle's model is trimmed (no float linears): the float32 baseline comes from the
    installed built-in model of the same identity, read from its file (nothing big cached)."""
    cache = tmp_path / "empty-cache"
    text = tmp_path / "text.txt"
    text.write_text(PROMPT)
    proc = mllm("eval", str(deployed.bundle), "--text", str(text), "--max-tokens", "300", "--json", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["tokens"] == 300 and report["baseline_perplexity"] > 1
    assert 0.9 < report["perplexity"] / report["baseline_perplexity"] < 1.1
    assert report["bundle_accuracy"]["ppl_ratio"] == deployed.lock.accuracy.ppl_ratio
    assert report["backend"].startswith("ort-cpu")
    assert dir_bytes(cache) < BIG


def test_eval_on_the_bundle_without_its_original_model_reports_the_build_accuracy(deployed, smallest_gguf, monkeypatch):
    """Where the original model is not on the machine (no built-in of that identity), `eval`
    still runs the bundle's path and shows the accuracy its build measured instead of a ratio."""
    monkeypatch.setattr(reference_module, "BUILTIN_MODELS", {})
    deployment = load_deployment(str(deployed.bundle), ())
    report = evaluate_profile(deployment, PROMPT, max_tokens=300, progress=False)
    assert report["baseline_perplexity"] is None and report["perplexity"] > 1
    assert report["bundle_accuracy"]["ppl_ratio"] == deployed.lock.accuracy.ppl_ratio
    text = report_text(report)
    assert "baseline (float32):   none" in text and "--reference MODEL" in text
    assert f"{deployed.lock.accuracy.ppl_ratio:.4f}x float on" in text
    with pytest.raises(UserError) as refused:  # a named reference that is not the bundle's model
        evaluate_profile(deployment, PROMPT, max_tokens=300, progress=False, reference=str(smallest_gguf))
    assert refused.value.diagnostics[0].key == "--reference"


def test_cold_shadow_rows_are_read_from_the_4bit_step_graph(tiny_qnn):
    """With 4-bit decode blocks of 32 the step graph holds a Q4_1 model's linears exactly: the
    bundle keeps no cold shadow blocks of its own, and the rows it reads from the step graph's data
    file are the cache entry's (the model's float32 rows) bit for bit. Its Q4_1 embedding is not
    what an 8-bit head holds, so the trimmed GGUF keeps that."""
    from mllm_deploy.compile.artifacts import Lockfile, artifacts_root, entry_key
    from mllm_deploy.compile.shadow_store import SHADOW_DIR, read_index
    from mllm_deploy.model.gguf_file import GGUFFile
    from mllm_deploy.runtime.shadow import ColdRows

    bundle = tiny_qnn.bundle
    lock = BundleLock.model_validate_json((bundle / "bundle.json").read_text())
    assert (lock.decode_weight_bits, lock.decode_weight_block) == (4, 32)
    assert not any(".cold" in rel for rel in lock.files)  # no second copy of the linears
    built = Lockfile.model_validate_json((bundle / "artifacts" / "lock.json").read_text())
    with cache_env(tiny_qnn.cache):
        entry = artifacts_root() / entry_key(built)
    cal = json.loads((bundle / "artifacts" / "calibration.json").read_text())
    assert cal["shadow_inputs"]
    for layer, kind in cal["shadow_inputs"]:
        index = read_index(bundle / "artifacts", layer, kind)
        assert [(c.type, c.file) for c in index.cold] == [("decode-u4", "../../decode/step_kv8.onnx.data")]
        channels = np.arange(index.n_in)
        shipped = ColdRows.open(bundle / "artifacts" / SHADOW_DIR, index)[channels]
        cached = ColdRows.open(entry / SHADOW_DIR, read_index(entry, layer, kind))[channels]
        assert shipped.shape == cached.shape and np.array_equal(shipped, cached), (layer, kind)
    gguf_path = bundle / lock.model.source
    assert "token_embd.weight" in GGUFFile(gguf_path).tensors


def test_a_q8_0_embedding_is_held_once_by_the_decode_head(tmp_path):
    """A tied Q8_0 embedding is the decode head's 8-bit blocks of 32 exactly: the bundle's GGUF leaves
    it out and its rows are read from decode/head.onnx.data, the one file holding them, and the
    bundle's run is token for token the profile's."""
    from mllm_deploy.compile.decode_weights import WeightRef
    from mllm_deploy.model.gguf_file import GGUFFile
    from mllm_deploy.model.gguf_trim import embedding_in_head

    model = tiny_models.write_tiny_gguf(tmp_path / "m", tied=True, cfg=tiny_models.SMALLEST, weight_type="Q8_0")
    profile = tmp_path / "q8.toml"
    profile.write_text(
        f'name = "q8"\n[model]\nsource = "{model}"\n[device]\nnpu_backend = "ort-cpu"\n'
        "[prefill]\nchunk_size = 8\nmax_context = 64\n[calibration]\nsamples = 1\ntokens_per_sample = 16\n"
        "[accuracy]\nmax_ppl_ratio = 2.0\n"
    )
    cache = tmp_path / "cache"
    build = mllm("build", str(profile), "--out", str(tmp_path / "bundle"), cache=cache)
    assert build.returncode == 0, build.stderr
    bundle = tmp_path / "bundle"
    lock = BundleLock.model_validate_json((bundle / "bundle.json").read_text())
    trimmed = GGUFFile(bundle / lock.model.source)
    where = embedding_in_head(trimmed)
    assert "token_embd.weight" not in trimmed.tensors and where is not None
    assert where.file == "../decode/head.onnx.data" and "decode/head.onnx.data" in lock.files
    # the head's codes are the original Q8_0 blocks' q + 128: the embedding's one copy
    original = GGUFFile(model).raw("token_embd.weight")  # [vocab, blocks * 34]: f16 d, 32 x int8 q
    q = original.reshape(original.shape[0], -1, 34)[:, :, 2:].copy().view(np.int8)
    refs = json.loads((bundle / "decode" / "manifest.json").read_text())["weights"]["head"]
    codes = WeightRef(**refs["head.wq"])
    held = np.fromfile(bundle / "decode" / "head.onnx.data", np.uint8, count=q.size, offset=codes.offset)
    assert np.array_equal(held.reshape(q.shape).astype(np.int16) - 128, q)
    args = ("--prompt", "hi there", "--max-new-tokens", "4", "--json")
    reference = mllm("run", str(profile), *args, cache=cache)
    run = mllm("run", str(bundle), *args, cache=tmp_path / "device-cache")
    assert reference.returncode == 0 and run.returncode == 0, run.stderr
    got, want = json.loads(run.stdout), json.loads(reference.stdout)
    assert (got["text"], got["generated_tokens"]) == (want["text"], want["generated_tokens"]) and got["text"]
