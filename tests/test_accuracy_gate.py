"""The accuracy gate of `build --out` (issue 16): the bundle's path against the float32 model on
the held-out text, stored in the lockfile; over `[accuracy] max_ppl_ratio` the build refuses
(exit 4, nothing written) unless `--force-accuracy`, which the lockfile records.

On the tiny random model (tests/tiny_models.py SMALLEST) a build with its bundle takes ~4 s here.
The real default model's gate is checked by tests/test_bundle_deploy.py (its ratio is ~1.02).
"""

from __future__ import annotations

import json

import pytest
from plan_fixtures import capabilities, pinned_host
from tiny_models import tiny_npu_sets as sets

from mllm_deploy import cli
from mllm_deploy.compile.bundle_lock import BundleAccuracy, BundleLock
from mllm_deploy.errors import ExitCode, UserError
from mllm_deploy.interface.accuracy import gate_accuracy, heldout_text, measured_path
from mllm_deploy.model import read_spec
from mllm_deploy.profile import load_profile
from mllm_deploy.resolve import resolve


def accuracy(ratio: float, limit: float = 1.05) -> BundleAccuracy:
    return BundleAccuracy(ppl_ratio=ratio, float_ppl=10.0, path_ppl=10.0 * ratio, tokens=512, text="heldout",
                          max_ppl_ratio=limit, measured_on="ort-cpu emulation (VNNI INT8)", chunk_size=256,
                          seconds=1.0)  # fmt: skip


def test_the_held_out_text_ships_with_the_package():
    text = heldout_text()
    assert len(text) > 15_000 and text.startswith("The River in October")


@pytest.mark.parametrize(("ratio", "force", "forced"), [(1.01, False, False), (1.05, False, False), (1.2, True, True)])
def test_gate_passes_within_the_limit_and_marks_a_forced_bundle(ratio, force, forced):
    loaded = load_profile(None)
    gated = gate_accuracy(accuracy(ratio), resolve(loaded, capabilities("host"), read_spec(loaded.profile.model.source)),
                          force=force)  # fmt: skip
    assert gated.forced is forced and gated.ppl_ratio == ratio


def test_gate_refuses_over_the_limit_naming_the_key_the_limit_and_the_measurement():
    loaded = load_profile(None, ["accuracy.max_ppl_ratio=1.1"])
    resolved = resolve(loaded, capabilities("host"), read_spec(loaded.profile.model.source))
    with pytest.raises(UserError) as caught:
        gate_accuracy(accuracy(1.234, 1.1), resolved)
    assert caught.value.exit_code == ExitCode.ACCURACY == 4
    (diag,) = caught.value.diagnostics
    assert diag.key == "accuracy.max_ppl_ratio" and diag.value == 1.234 and diag.allowed == "<= 1.1"
    assert "1.2340x" in diag.message and "no bundle was written" in diag.message
    assert "--force-accuracy" in (diag.hint or "")


def test_a_qnn_htp_target_off_device_is_measured_on_its_qdq_graphs_and_labelled_so():
    loaded = load_profile(None, ["device.target=sd8gen3", "device.npu_backend=qnn-htp"])
    resolved = resolve(loaded, capabilities("sd8gen3"), read_spec(loaded.profile.model.source))
    host = pinned_host()  # a recorded x86 probe (AMX): no Hexagon NPU
    path, label = measured_path(resolved, host)
    assert resolved.backend == "qnn-htp" and path.backend == "ort-cpu"
    assert host.probe is not None and resolved.cpu_threads == 8 > host.probe.usable_cpus  # the phone's cores
    assert path.cpu_threads == path.npu_threads == host.probe.usable_cpus  # this machine's
    assert label == "ort-cpu emulation of the qnn-htp QDQ graphs (AMX INT8)" and path.backend_label == label
    # on a Snapdragon the gate runs the context binaries themselves
    phone = host.model_copy(update={"probe": host.probe.model_copy(update={"qnn_htp_mode": "device"})})
    same, phone_label = measured_path(resolved, phone)
    assert same.backend == "qnn-htp" and phone_label == resolved.backend_label
    plain = load_profile(None)
    cpu, cpu_label = measured_path(resolve(plain, host, read_spec(plain.profile.model.source)), host)
    assert cpu.backend == "ort-cpu" and cpu_label == "ort-cpu emulation (AMX INT8)"


def test_max_ppl_ratio_must_be_above_one():
    assert load_profile(None).profile.accuracy.max_ppl_ratio == 1.05
    with pytest.raises(UserError) as caught:
        load_profile(None, ["accuracy.max_ppl_ratio=1.0"])
    assert caught.value.diagnostics[0].key == "accuracy.max_ppl_ratio"


def test_build_refuses_over_the_limit_writes_nothing_and_force_records_it(
    smallest_gguf, private_cache, tmp_path, capsys
):
    out = tmp_path / "bundle"
    tight = sets(smallest_gguf, "accuracy.max_ppl_ratio=1.0001")
    assert cli.main(["build", *tight, "--out", str(out)]) == ExitCode.ACCURACY
    captured = capsys.readouterr()
    assert "accuracy.max_ppl_ratio" in captured.err and "over the limit 1.0001" in captured.err
    assert "Traceback" not in captured.err and "bundle:" not in captured.out
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []
    # the gate is for bundles: a build into the cache alone measures nothing and succeeds
    assert cli.main(["build", *tight]) == 0
    assert "accuracy:" not in capsys.readouterr().out
    assert cli.main(["build", *tight, "--force-accuracy"]) == ExitCode.INVALID  # needs --out
    assert "--force-accuracy needs --out" in capsys.readouterr().err

    assert cli.main(["build", *tight, "--out", str(out), "--force-accuracy"]) == 0
    report = capsys.readouterr().out
    lock = BundleLock.model_validate(json.loads((out / "bundle.json").read_text()))
    acc = lock.accuracy
    assert acc is not None and acc.forced and acc.max_ppl_ratio == 1.0001 and acc.ppl_ratio > 1.0001
    assert acc.ppl_ratio == pytest.approx(acc.path_ppl / acc.float_ppl)
    assert acc.tokens == 128 and acc.chunk_size == 8  # the held-out text's first max_context tokens
    assert acc.measured_on == lock.backend_label and acc.measured_on.startswith("ort-cpu emulation")
    assert f"{acc.ppl_ratio:.4f}x (limit 1.0001; OVER THE LIMIT, written with --force-accuracy)" in report
    # measured, not made up: the refusal named the same ratio the forced build recorded
    assert f"{acc.ppl_ratio:.4f}x" in captured.err
