"""What the probe says this machine has, and how a profile's plan runs here: the labels (`RunHere`)
next to what the profile targets, the threads really used, and the refusals without an opt-in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from plan_fixtures import REPO

from mllm_deploy.device import HostProbe, MachineHere, hexagon_here, this_machine
from mllm_deploy.device.catalog import catalog_entries
from mllm_deploy.device.host import cpu_label
from mllm_deploy.interface.deployment import run_here
from mllm_deploy.profile import load_profile
from mllm_deploy.resolve import resolve

GOLDEN_PROBE = json.loads((Path(__file__).parent / "golden" / "host_probe.json").read_text())


def probe(**changes) -> HostProbe:
    """The pinned 2-core probe (tests/golden/host_probe.json) with `changes`."""
    return HostProbe.model_validate({**GOLDEN_PROBE, **changes})


def machine(**changes) -> MachineHere:
    p = probe(**changes)
    return MachineHere(p, hexagon_here(p, catalog_entries()))


X86_SIMULATOR = machine()  # Sapphire Rapids, 2 usable CPUs, AMX, onnxruntime-qnn: the HTP simulator
X86_PLAIN = machine(qnn_available=False, qnn_htp_mode="absent", has_amx_int8=False)
SM8650 = machine(machine="aarch64", cpu_model="Kryo", qnn_htp_mode="device", soc_machine="SM8650", usable_cpus=8)
SM8550 = machine(machine="aarch64", cpu_model="Kryo", qnn_htp_mode="device", soc_machine="SM8550", usable_cpus=8)


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        if line.lower().startswith(("flags", "features")):
            return set(line.partition(":")[2].split())
    return set()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="checks the x86-64 labels of the probe")
def test_the_probe_labels_this_machine_truthfully(private_cache):
    here = this_machine(use_probe_cache=False)
    flags = _cpu_flags()
    units = [("amx_int8", "AMX INT8"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI")]
    isa = next((name for flag, name in units if flag in flags), "no VNNI/AMX")
    cpus = len(os.sched_getaffinity(0))
    assert here.usable_cpus == cpus
    assert cpu_label(here.probe) == f"x86_64 {here.probe.cpu_model}, {cpus} usable CPU(s), {isa}"
    assert here.hexagon is None  # no Hexagon on x86; the kernel names no SoC part
    assert (here.probe.soc_machine, here.probe.board_model, here.probe.npu_metadata) == (None, None, {})
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        assert here.npu_label == "no Hexagon NPU and no QNN HTP simulator"
    else:
        assert here.npu_label == "QNN HTP simulator (x86-64)"
        assert here.label.endswith("; QNN HTP simulator (x86-64)")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"soc_machine": "SM8650"}, ("SM8650", "sd8gen3", 75, 57, "/sys/devices/soc0/machine")),
        ({"board_model": "Qualcomm Technologies, Inc. SM8550 QRD"}, ("SM8550", "sd8gen2", 73, 43, "/proc/device-tree/model")),
        ({"soc_machine": "SM9999"}, ("SM9999", None, None, None, "which the catalog does not list")),
        ({}, (None, None, None, None, "the kernel names no SoC part")),
    ],
)  # fmt: skip
def test_a_hexagon_is_identified_from_the_kernel_and_the_catalog(changes, expected):
    found = hexagon_here(probe(qnn_htp_mode="device", machine="aarch64", **changes), catalog_entries())
    assert found is not None
    assert (found.part, found.catalog_id, found.htp_arch, found.soc_model) == expected[:4]
    assert expected[4] in found.source


def test_no_hexagon_on_the_simulator():
    assert hexagon_here(probe(), catalog_entries()) is None
    assert X86_SIMULATOR.npu_label == "QNN HTP simulator (x86-64)"
    assert SM8650.npu_label == "Hexagon NPU HTP v75 (SM8650)"


@pytest.fixture(scope="module")
def sd8gen3(smollm_spec):
    return resolve(load_profile(None, ["device.target=sd8gen3"]), catalog_entries()["sd8gen3"], smollm_spec)


def test_a_phone_target_is_refused_on_x86_without_an_opt_in(sd8gen3):
    here = run_here(sd8gen3, X86_SIMULATOR)
    assert here.mode == "refused"
    assert here.refusal == (
        "sd8gen3 needs a Hexagon NPU (HTP v75); this machine has x86_64 Intel(R) Xeon(R) Processor, "
        "2 usable CPU(s), AMX INT8; QNN HTP simulator (x86-64)"
    )
    assert here.hint is not None and "--emulate" in here.hint and "--simulator" in here.hint
    assert here.line.startswith("cannot run here: sd8gen3 needs a Hexagon NPU (HTP v75)")
    plain = run_here(sd8gen3, X86_PLAIN)
    assert plain.mode == "refused" and plain.hint is not None and "--simulator" not in plain.hint


def test_the_opt_ins_say_what_runs_and_the_threads_really_used(sd8gen3):
    assert sd8gen3.backend_label == "QNN HTP v75" and sd8gen3.cpu_threads == 8  # the target's plan
    emulated = run_here(sd8gen3, X86_SIMULATOR, "emulate")
    assert (emulated.mode, emulated.label) == ("emulation", "ort-cpu emulation of sd8gen3's graphs (AMX INT8)")
    assert emulated.threads_label == "cpu 2 (target 8), npu 1"
    simulated = run_here(sd8gen3, X86_SIMULATOR, "simulator")
    assert (simulated.mode, simulated.label) == ("simulator", "QNN HTP simulator v75 (x86-64)")
    assert simulated.threads_label == "cpu 2 (target 8), npu 0"
    assert any("200-700x slower" in note for note in simulated.notes)
    no_sim = run_here(sd8gen3, X86_PLAIN, "simulator")
    assert no_sim.mode == "refused" and no_sim.refusal is not None and "no QNN HTP simulator either" in no_sim.refusal
    bundle = run_here(sd8gen3, X86_SIMULATOR, "emulate", bundle_has_graphs=False)
    assert (
        bundle.mode == "refused" and bundle.refusal is not None and "ships QNN context binaries only" in bundle.refusal
    )


def test_on_a_snapdragon_the_target_runs_on_its_own_arch_only(sd8gen3):
    on_phone = run_here(sd8gen3, SM8650)
    assert (on_phone.mode, on_phone.label, on_phone.refusal) == ("hexagon", "QNN HTP v75 (Hexagon NPU, SM8650)", None)
    assert on_phone.threads_label == "cpu 8, npu 0"
    other = run_here(sd8gen3, SM8550)
    assert other.mode == "refused" and other.refusal is not None
    assert "sd8gen3 needs a Hexagon NPU (HTP v75); this machine's is Hexagon NPU HTP v73 (SM8550)" in other.refusal
    assert other.hint is not None and "device.target = 'sd8gen2'" in other.hint


def test_the_host_and_a_float_plan_run_natively(smollm_spec):
    host = catalog_entries()["host"].model_copy(update={"probe": probe()})
    resolved = resolve(load_profile(None, []), host, smollm_spec)
    here = run_here(resolved, X86_SIMULATOR)
    assert (here.mode, here.label, here.refusal) == ("native", "ort-cpu emulation (AMX INT8)", None)
    floats = resolve(load_profile(None, ["device.target=sd8gen3", "device.npu_backend=none"]),
                     catalog_entries()["sd8gen3"], smollm_spec)  # fmt: skip
    native = run_here(floats, X86_SIMULATOR, "emulate")
    assert (native.mode, native.label, native.threads_label) == (
        "native",
        "none (float32 on the CPU)",
        "cpu 2 (target 8), npu 0",
    )
    assert native.notes == ("--emulate has no effect: sd8gen3's plan runs no Hexagon graphs",)


def _plan(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLLM_DEPLOY_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "mllm_deploy", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)  # fmt: skip


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the x86 host has no Hexagon NPU")
def test_plan_says_how_the_target_runs_on_this_machine(tmp_path):
    done = _plan("profiles/sd8gen3.toml", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "  npu backend  QNN HTP v75\n  scheduler    out-of-order\n  threads      cpu 8, npu 0\n" in done.stdout
    assert (
        "  on this machine: cannot run here: sd8gen3 needs a Hexagon NPU (HTP v75); this machine has x86_64 "
        in done.stdout
    )
    assert "use --emulate (the same graphs on the CPU, labelled emulation)" in done.stdout
    usable = len(os.sched_getaffinity(0))
    emulated = _plan("profiles/sd8gen3.toml", "--emulate", "--json", cache=tmp_path)
    here = json.loads(emulated.stdout)["on_this_machine"]
    assert (here["mode"], here["cpu_threads"], here["target_cpu_threads"]) == ("emulation", min(8, usable), 8)
    assert here["label"].startswith("ort-cpu emulation of sd8gen3's graphs (")
    host = _plan(cache=tmp_path)
    assert host.returncode == 0, host.stderr
    assert "  on this machine: runs as ort-cpu emulation (" in host.stdout
    assert f"; threads cpu {usable}, npu {max(1, usable // 2)}; machine: x86_64 " in host.stdout


def test_devices_shows_the_soc_and_the_identified_hexagon():
    from mllm_deploy.cli.devices_cmd import render_host

    phone = probe(machine="aarch64", qnn_htp_mode="device", soc_machine="SM8650", soc_id=557,
                  board_model="Qualcomm Technologies, Inc. SM8650 QRD")  # fmt: skip
    text = render_host(catalog_entries()["host"].model_copy(update={"probe": phone}))
    assert "  SoC: SM8650 (kernel soc_id 557); board: Qualcomm Technologies, Inc. SM8650 QRD\n" in text
    assert "  Hexagon: SM8650 = sd8gen3 (HTP v75, soc_model 57); /sys/devices/soc0/machine names SM8650" in text
    x86 = render_host(catalog_entries()["host"].model_copy(update={"probe": probe()}))
    assert "SoC:" not in x86 and "Hexagon:" not in x86 and "QNN HTP: x86 simulator" in x86
